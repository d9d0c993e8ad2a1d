"""Routed experts per token (RL routing replay) against transformers' own gate, hooked: every
preset in both weight dialects with batching and chunked prefill, under expert parallelism, after a
prefix-cache hit, and across preemption. The order within each token's k ids is the gate's
(torch.topk unsorted) and is compared exactly."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import pytest
import torch

from runtime.lm_service.offline import GenerationResult, OfflineLLM
from runtime.protocol import ExpertRouting
from runtime.requests import ChatRequest, SamplingParams
from runtime.settings import EngineConfig
from tests.integration.workload import mixed, reference_inputs
from tests.reference import reference_model, reference_routing

# A 16-token budget chunks every prompt's prefill and mixes it with other requests' decodes.
CHUNKED = EngineConfig(kv_cache_mb=8, block_size=4, prefix_caching=False, max_num_batched_tokens=16)


def _asking(requests: list[ChatRequest]) -> list[ChatRequest]:
    return [dataclasses.replace(r, sampling=msgspec.structs.replace(r.sampling, return_routed_experts=True))
            for r in requests]


def _matrix(routing: ExpertRouting | None) -> np.ndarray:
    assert routing is not None and routing.dtype == "int16"
    return np.frombuffer(routing.data, "<i2").reshape(routing.shape)


def _run(llm: OfflineLLM, requests: list[ChatRequest]) -> list[GenerationResult]:
    for i, r in enumerate(requests):
        llm.submit(str(i), r)
    results = llm.run()
    return [results[str(i)] for i in range(len(requests))]


def _assert_reference_routing(llm: OfflineLLM, ref, request: ChatRequest, result: GenerationResult) -> None:
    """Ours equal transformers' gate over the tokens that passed through the model: the prompt,
    then every generated token but the last."""
    inputs = reference_inputs(llm, request)
    inputs["input_ids"] = torch.tensor([inputs["input_ids"][0].tolist() + result.token_ids[:-1]])
    expected = reference_routing(ref, inputs).numpy()
    got = _matrix(result.routed_experts)
    text = llm.config.text
    moe_layers = sum(text.is_moe_layer(i) for i in range(text.num_hidden_layers))
    assert got.shape == (result.prompt_tokens + len(result.token_ids) - 1, moe_layers, text.num_experts_per_tok)
    assert got.shape == expected.shape
    assert (got == expected).all(), f"first differing token: {int(np.argwhere(got != expected)[0][0])}"


@pytest.mark.parametrize("dialect", ["transformers", "original"])
@pytest.mark.parametrize("preset", ["tiny", "mla576", "odd"])
def test_batched_chunked_routing_equals_transformers(checkpoints, preset: str, dialect: str) -> None:
    path = checkpoints(preset, dialect)
    llm, ref = OfflineLLM(path, CHUNKED), reference_model(str(path))
    requests = _asking(mixed(4, seed=11, max_tokens=(3, 6))) + mixed(1, seed=12)
    results = _run(llm, requests)
    assert results[-1].routed_experts is None, "a request that did not ask gets nothing"
    assert max(r.prompt_tokens for r in results) > CHUNKED.max_num_batched_tokens, "prefill must be chunked"
    for request, result in zip(requests[:-1], results[:-1], strict=True):
        _assert_reference_routing(llm, ref, request, result)


def test_routing_under_expert_parallelism_is_global_and_equal(checkpoints) -> None:
    """The gate runs on rank 0 over all experts, so its ids are global ones."""
    path = checkpoints("odd", "original")  # 12 experts, 6 per rank
    llm = OfflineLLM(path, dataclasses.replace(CHUNKED, ep_size=2))
    requests = _asking(mixed(3, seed=13, max_tokens=(3, 6)))
    try:
        results = _run(llm, requests)
    finally:
        llm.close()
    ids = np.concatenate([_matrix(r.routed_experts).reshape(-1) for r in results])
    assert ids.max() >= 6 and ids.min() < 6, "ids of both ranks' experts appear"
    ref = reference_model(str(path))
    for request, result in zip(requests, results, strict=True):
        _assert_reference_routing(llm, ref, request, result)


def test_a_cached_prompt_still_returns_its_routing(checkpoints) -> None:
    """A request that asks reads no cached blocks (its prompt runs in its own forwards, so the
    routing is the one it had), while the blocks it computes still serve others."""
    path = checkpoints("tiny")
    llm, ref = OfflineLLM(path, dataclasses.replace(CHUNKED, prefix_caching=True)), reference_model(str(path))
    ids = llm.prompts.tokenizer("A prompt long enough to fill several cache blocks of four tokens each.")["input_ids"]
    plain = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    asking = msgspec.structs.replace(plain, return_routed_experts=True)
    outcomes: list[GenerationResult] = []
    for request_id, params in (("warm", plain), ("first", asking), ("second", asking), ("plain", plain)):
        llm.submit_ids(request_id, ids, params)
        outcomes.append(llm.run()[request_id])
    warm, first, second, after = outcomes
    assert warm.cached_tokens == 0 and after.cached_tokens > 0
    assert first.cached_tokens == second.cached_tokens == 0
    assert first.token_ids == second.token_ids == warm.token_ids
    assert (_matrix(first.routed_experts) == _matrix(second.routed_experts)).all()
    with torch.no_grad():
        expected = reference_routing(ref, {"input_ids": torch.tensor([ids + first.token_ids[:-1]])}).numpy()
    assert (_matrix(first.routed_experts) == expected).all()
    assert first.to_json()["routed_experts"]["shape"] == list(expected.shape)  # the offline CLI's answer too


def test_routing_across_preemption_equals_transformers(checkpoints) -> None:
    """A preempted request recomputes its positions; the first record of each stands, once."""
    path = checkpoints("tiny")
    requests = _asking(mixed(8, seed=8, max_tokens=(10, 16)))
    probe = OfflineLLM(path, CHUNKED)
    longest = max(len(probe.prompts.token_ids(r.messages, probe.encode_images(r.images)[1])) for r in requests) + 16
    tight = OfflineLLM(path, dataclasses.replace(CHUNKED, num_blocks=longest // 4 + 4, prefix_caching=True,
                                                 max_num_batched_tokens=64))
    results = _run(tight, requests)
    assert tight.engine.stats().preemptions > 0
    ref = reference_model(str(path))
    for request, result in zip(requests, results, strict=True):
        _assert_reference_routing(tight, ref, request, result)
