"""INT4 parity: greedy tokens of our runtime on an INT4 checkpoint (routed experts packed, as the
Kimi-K2.5 release stores them) equal transformers 5.18's on its dequantized float32 twin, for every
preset in both weight dialects, with 0, 1 and 2 images batched together, and with expert parallelism."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.checkpoint.loader import load_language_model, routed_expert_bytes
from runtime.lm_service.offline import OfflineLLM
from runtime.models.experts import Int4RoutedExperts
from runtime.requests import ChatRequest, SamplingParams
from runtime.settings import EngineConfig
from tests.integration.workload import chat, png, reference_inputs
from tests.reference import reference_greedy, reference_model

PRESETS = ["tiny", "odd", "mla576"]
DIALECTS = ["transformers", "original"]
SMALL = EngineConfig(kv_cache_mb=8, block_size=4, prefix_caching=False)


def _requests() -> list[ChatRequest]:
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [
        chat("Count to ten, slowly.", [], greedy),
        chat("Describe the picture.", [png(56, 84, seed=1)], greedy),
        chat("How do the two differ?", [png(100, 37, seed=2), png(140, 140, seed=3)], greedy),
    ]


def _run_batched(llm: OfflineLLM, requests: list[ChatRequest]) -> list[list[int]]:
    for i, r in enumerate(requests):
        llm.submit(f"r{i}", r)
    results = llm.run()
    return [results[f"r{i}"].token_ids for i in range(len(requests))]


def _expected(twin, llm: OfflineLLM, requests: list[ChatRequest]) -> list[list[int]]:
    ref = reference_model(str(twin))
    return [reference_greedy(ref, reference_inputs(llm, r), r.sampling.max_tokens or 0)[0] for r in requests]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("preset", PRESETS)
def test_int4_greedy_tokens_match_transformers_on_the_twin(int4_checkpoints, preset: str, dialect: str) -> None:
    int4, twin = int4_checkpoints(preset, dialect)
    llm = OfflineLLM(int4, SMALL)
    assert isinstance(llm.engine.runner.lm.layers[-1].mlp.experts, Int4RoutedExperts)
    requests = _requests()
    assert _run_batched(llm, requests) == _expected(twin, llm, requests)


def test_int4_expert_parallel_matches_transformers(int4_checkpoints) -> None:
    int4, twin = int4_checkpoints("odd", "original")  # 12 experts: 6 packed per rank
    total = routed_expert_bytes(load_language_model(int4))
    llm = OfflineLLM(int4, dataclasses.replace(SMALL, ep_size=2))
    requests = _requests()
    try:
        got = _run_batched(llm, requests)
        per_rank = llm.engine.stats().ep_expert_bytes
    finally:
        llm.close()
    assert got == _expected(twin, llm, requests)
    assert per_rank == [total // 2] * 2
