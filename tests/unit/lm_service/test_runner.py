"""The runner records routed experts only for the inputs that ask, and nothing when none does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.checkpoint.maker import init_random, model_config_of
from runtime.lm_service.kv_cache import PagedLatentCache
from runtime.lm_service.runner import ModelRunner, StepInput, StepLogits
from runtime.models.deepseek_v3 import DeepseekV3LM, MoE


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    config = model_config_of("odd", vocab_size=64)  # 2 dense layers, then 2 MoE layers of 3 experts per token
    lm = DeepseekV3LM(config.text, config.tie_word_embeddings)
    init_random(lm, torch.Generator().manual_seed(0))
    return ModelRunner(lm.eval(), config, PagedLatentCache(config.text, 8, 4, torch.float32))


def _inputs(ask: tuple[bool, bool]) -> list[StepInput]:
    return [StepInput([5, 6, 7, 8, 9], [0, 1], 0, True, records_routing=ask[0]),
            StepInput([10, 11, 12], [2], 0, True, records_routing=ask[1])]


def _execute(runner: ModelRunner, ask: tuple[bool, bool]) -> tuple[StepLogits, list, list]:
    """Run one step; return it, the `routed` argument each MoE layer got, and each gate's ids."""
    passed, gate_ids = [], []
    moes = [m for m in runner.lm.modules() if isinstance(m, MoE)]
    hooks = [m.register_forward_pre_hook(lambda _m, args: passed.append(args[1])) for m in moes]
    hooks += [m.gate.register_forward_hook(lambda _m, _a, out: gate_ids.append(out[1])) for m in moes]
    try:
        step = runner.execute(_inputs(ask))
    finally:
        for h in hooks:
            h.remove()
    return step, passed, gate_ids


def test_no_request_asking_records_nothing(runner: ModelRunner) -> None:
    step, passed, _ = _execute(runner, (False, False))
    assert passed == [None, None], "no recording list is made, so the MoE layers do no extra work"
    assert step.routing == {}


def test_only_the_inputs_that_ask_get_their_rows(runner: ModelRunner) -> None:
    step, _, gate_ids = _execute(runner, (False, True))
    routing = step.routing
    assert list(routing) == [1]
    assert routing[1].dtype == np.int16 and routing[1].shape == (3, 2, 3)  # 3 rows, 2 MoE layers, k = 3
    expected = torch.stack(gate_ids, dim=1)[5:8]  # the second input's rows, every MoE layer in order
    assert (routing[1] == expected.numpy()).all()
