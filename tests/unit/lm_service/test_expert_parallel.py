"""Expert parallelism over real processes and a real gloo group."""

from __future__ import annotations

import time

import pytest
import torch

from runtime.checkpoint.loader import load_language_model
from runtime.lm_service.expert_parallel import ExpertGroup, expert_range
from runtime.lm_service.offline import OfflineLLM
from runtime.models.config import load_model_config
from runtime.models.deepseek_v3 import MoE
from runtime.settings import EngineConfig
from tests.integration.workload import mixed


def test_expert_ranges_cover_every_expert_once() -> None:
    for n, size in [(8, 1), (8, 2), (12, 4), (10, 4), (7, 7)]:
        ranges = [expert_range(n, size, r) for r in range(size)]
        owned = [e for first, count in ranges for e in range(first, first + count)]
        assert owned == list(range(n))
        assert max(c for _, c in ranges) - min(c for _, c in ranges) <= 1
    with pytest.raises(ValueError):
        expert_range(4, 5, 0)


@torch.inference_mode()
def test_a_rank_with_no_tokens_still_answers(checkpoints) -> None:
    """Tokens routed only to rank 0's experts: rank 1 takes part, adds zeros, nobody hangs."""
    path = checkpoints("tiny")
    cfg = load_model_config(path)
    full = load_language_model(path, cfg)
    lm, group = ExpertGroup.start(str(path), 2, "float32", "cpu", 30.0, 1,
                                  lambda experts: load_language_model(path, cfg, expert_range=experts),
                                  cfg.text.n_routed_experts)
    try:
        moe = next(m for m in lm.modules() if isinstance(m, MoE))
        reference = next(m for m in full.modules() if isinstance(m, MoE))
        x = torch.randn(5, cfg.text.hidden_size)
        ids = torch.tensor([[0, 1]] * 5)  # both on rank 0 (experts 0..3)
        weights = torch.rand(5, 2)
        group.begin_forward(5)
        for layer in (m for m in lm.modules() if isinstance(m, MoE)):  # every MoE layer, in order
            out = group.dispatch(layer.experts, x, ids, weights)
            if layer is moe:
                first = out
        torch.testing.assert_close(first, reference.experts(x, ids, weights))
    finally:
        group.close()
    assert all(not p.is_alive() for p in group.workers)


def test_a_dead_rank_fails_the_step_instead_of_hanging(checkpoints) -> None:
    llm = OfflineLLM(checkpoints("tiny"), EngineConfig(kv_cache_mb=4, ep_size=2, ep_timeout_s=20))
    try:
        llm.submit("r", mixed(1, seed=3)[0])
        llm.step()
        group = llm.engine.expert_group
        assert group is not None
        group.workers[0].kill()
        group.workers[0].join()
        started = time.perf_counter()
        with pytest.raises(RuntimeError):
            for _ in range(50):
                llm.step()
        assert time.perf_counter() - started < 25
    finally:
        llm.close()
