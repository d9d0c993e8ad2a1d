"""The engine on real tiny checkpoints: batching invariance against transformers, expert
parallelism across processes, the latent-only KV cache, prefix caching, aborts and preemption."""

from __future__ import annotations

import dataclasses
import random

import msgspec
import pytest
import torch

from runtime.checkpoint.loader import load_language_model, routed_expert_bytes
from runtime.lm_service.offline import OfflineLLM
from runtime.models.config import load_model_config
from runtime.requests import ChatRequest, SamplingParams
from runtime.settings import EngineConfig
from tests.integration.workload import chat, mixed, png, reference_inputs
from tests.reference import reference_greedy, reference_model

SMALL = EngineConfig(kv_cache_mb=8, block_size=4, prefix_caching=False)


def _run_alone(llm: OfflineLLM, requests: list[ChatRequest]) -> list[list[int]]:
    return [llm.generate(r, f"alone-{i}").token_ids for i, r in enumerate(requests)]


def _run_together(llm: OfflineLLM, requests: list[ChatRequest], seed: int = 0) -> list[list[int]]:
    """Requests arrive in random groups between steps, so they join a batch already running."""
    rng = random.Random(seed)
    pending = list(enumerate(requests))
    while pending:
        for _ in range(rng.randint(1, 6)):
            if pending:
                i, r = pending.pop(0)
                llm.submit(f"together-{i}", r)
        for _ in range(rng.randint(0, 4)):
            llm.step()
    results = llm.run()
    return [results[f"together-{i}"].token_ids for i in range(len(requests))]


def test_batched_equals_alone_equals_transformers(checkpoints) -> None:
    path = checkpoints("tiny")
    llm, ref = OfflineLLM(path, SMALL), reference_model(str(path))
    requests = mixed(32, seed=1)
    alone = _run_alone(llm, requests)
    steps_alone = llm.engine.stats().steps
    together = _run_together(llm, requests)
    assert llm.engine.stats().steps - steps_alone < steps_alone / 4, "requests were not batched"
    for i, r in enumerate(requests):
        expected, _ = reference_greedy(ref, reference_inputs(llm, r), r.sampling.max_tokens or 0)
        assert alone[i] == expected, f"request {i} alone differs from transformers"
        assert together[i] == expected, f"request {i} batched differs from transformers"


def test_seeded_sampling_does_not_depend_on_batching(checkpoints) -> None:
    llm = OfflineLLM(checkpoints("tiny"), SMALL)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_tokens=10, ignore_eos=True)
    requests = [dataclasses.replace(r, sampling=msgspec.structs.replace(params, seed=i))
                for i, r in enumerate(mixed(6, seed=2))]
    assert _run_alone(llm, requests) == _run_together(llm, requests, seed=3)


@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_matches_one_rank(checkpoints, ep_size: int) -> None:
    path = checkpoints("odd", "original")  # 12 experts: 6 or 3 per rank
    requests = mixed(8, seed=4)
    single = OfflineLLM(path, SMALL)
    expected = _run_together(single, requests)
    total = routed_expert_bytes(load_language_model(path))
    parallel = OfflineLLM(path, dataclasses.replace(SMALL, ep_size=ep_size))
    try:
        assert _run_together(parallel, requests) == expected
        per_rank = parallel.engine.stats().ep_expert_bytes
    finally:
        parallel.close()
    assert per_rank == [total // ep_size] * ep_size
    assert routed_expert_bytes(parallel.engine.runner.lm) == total // ep_size  # rank 0's own model too


@pytest.mark.parametrize(("preset", "fp8"), [("tiny", False), ("mla576", False), ("odd", False), ("tiny", True)])
def test_kv_bytes_per_token_equal_the_latent(checkpoints, preset: str, fp8: bool) -> None:
    path = checkpoints(preset)
    text = load_model_config(path).text
    llm = OfflineLLM(path, dataclasses.replace(SMALL, kv_fp8=fp8))
    cache = llm.engine.cache
    measured = cache.data.untyped_storage().nbytes() // (cache.num_blocks * cache.block_size)
    latent = text.num_hidden_layers * (text.kv_lora_rank + text.qk_rope_head_dim) * (1 if fp8 else 4)
    assert measured == latent == llm.engine.stats().kv_bytes_per_token
    if fp8:  # fp8 storage still answers (float32 compute); output need not equal the exact cache's
        assert len(llm.generate(mixed(1, seed=5)[0]).token_ids) > 0


def test_prefix_cache_hits_for_shared_text_and_same_image_only(checkpoints) -> None:
    path = checkpoints("tiny")
    llm = OfflineLLM(path, dataclasses.replace(SMALL, prefix_caching=True))
    fresh = OfflineLLM(path, SMALL)
    system = "You are a careful assistant. " * 12
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    image, other = png(140, 140, seed=7), png(140, 140, seed=8)

    first = llm.generate(chat("Name a colour.", [], greedy, system), "a")
    before = llm.engine.stats().prefill_tokens
    second = llm.generate(chat("Name an animal.", [], greedy, system), "b")
    computed = llm.engine.stats().prefill_tokens - before
    assert second.cached_tokens >= 64 and computed == second.prompt_tokens - second.cached_tokens
    assert second.token_ids == fresh.generate(chat("Name an animal.", [], greedy, system)).token_ids
    assert first.cached_tokens == 0

    with_image = chat("What is in the picture?", [image], greedy, system)
    llm.generate(with_image, "c")
    again = llm.generate(with_image, "d")
    start = next(i for i, t in enumerate(_prompt_ids(llm, with_image)) if t == llm.config.image_token_id)
    assert again.cached_tokens > start, "the same image should be served from the cache"
    assert again.token_ids == fresh.generate(with_image).token_ids
    swapped = llm.generate(dataclasses.replace(with_image, images=[other]), "e")
    assert swapped.cached_tokens <= start, "a different image must not reuse the first image's KV"
    assert swapped.token_ids == fresh.generate(dataclasses.replace(with_image, images=[other])).token_ids


def _prompt_ids(llm: OfflineLLM, request: ChatRequest) -> list[int]:
    _, sizes = llm.encode_images(request.images)
    return llm.prompts.token_ids(request.messages, sizes)


def test_aborts_and_failures_free_every_block(checkpoints) -> None:
    llm = OfflineLLM(checkpoints("tiny"), dataclasses.replace(SMALL, prefix_caching=True))
    engine = llm.engine
    released: list[str] = []
    engine.hooks.released = released.append
    requests = mixed(16, seed=6)
    rng = random.Random(0)
    for i, r in enumerate(requests):
        llm.submit(str(i), r)
        if rng.random() < 0.5:
            llm.step()
        if i % 4 == 1:
            assert llm.abort(str(i - 1))  # waiting, prefilling or decoding
    engine.fail("5", "the vision pool failed this image")
    assert not engine.add_embeddings("no-such-request", 0, torch.zeros(1, 1))
    if requests[6].images:
        engine.add_embeddings("6", 0, torch.zeros(1, 1))  # wrong shape: fails request 6 alone
    results = llm.run()
    assert engine.stats().kv_blocks_used == 0 and engine.stats().dropped_embeddings == 1
    assert not engine.states and not engine.embeddings
    assert sorted(released) == sorted(str(i) for i in range(16)), "every request released exactly once"
    assert results["5"].finish_reason == "error" and "vision pool" in (results["5"].error or "")
    assert all(results[str(k)].finish_reason == "abort" for k in (0, 4, 8, 12))
    assert all(results[str(k)].finish_reason == "length" for k in (2, 3, 7, 9, 15))


def test_preemption_under_a_small_cache_gives_identical_outputs(checkpoints) -> None:
    path = checkpoints("tiny")
    requests = mixed(10, seed=8, max_tokens=(10, 16))
    roomy = _run_together(OfflineLLM(path, SMALL), requests)
    longest = max(len(_prompt_ids(OfflineLLM(path, SMALL), r)) for r in requests) + 16
    tight = OfflineLLM(path, dataclasses.replace(SMALL, num_blocks=longest // 4 + 4, prefix_caching=True))
    reencoded: list[str] = []
    encode_again = tight.engine.hooks.need_embeddings
    tight.engine.hooks.need_embeddings = lambda rid, idx: (reencoded.append(rid), encode_again(rid, idx))
    assert _run_together(tight, requests) == roomy
    stats = tight.engine.stats()
    assert stats.preemptions > 0 and stats.kv_blocks_used == 0
    assert reencoded, "a preempted image request must get its dropped embeddings back"


def _prompt_logprob_run(llm: OfflineLLM, ids: list[int], request_id: str, top: int, max_tokens: int):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=top, ignore_eos=True)
    llm.submit_ids(request_id, ids, params)
    outputs = []
    while llm.engine.has_unfinished():
        outputs += [o for o in llm.step() if o.request_id == request_id]
    return outputs


def test_prompt_logprobs_come_from_the_prefill_and_equal_transformers(checkpoints) -> None:
    """Computed chunk by chunk (a small token budget splits the prompt), even when the prompt is in
    the prefix cache, and delivered once with the first output; max_tokens 0 generates nothing."""
    path = checkpoints("tiny")
    config = dataclasses.replace(SMALL, prefix_caching=True, max_num_batched_tokens=16)
    llm, ref = OfflineLLM(path, config), reference_model(str(path))
    ids = llm.prompts.tokenizer("The quick brown fox jumps over the lazy dog, and then the cat sat on the mat "
                                "while numbers 1 2 3 4 5 went by.")["input_ids"]
    assert len(ids) > 2 * 16, "the prompt must span several prefill chunks"
    with torch.no_grad():
        expected = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    llm.submit_ids("warm", ids, SamplingParams(temperature=0.0, max_tokens=1))  # fills the prefix cache
    llm.run()
    for request_id, max_tokens in (("one", 1), ("none", 0)):
        outputs = _prompt_logprob_run(llm, ids, request_id, top=3, max_tokens=max_tokens)
        first = outputs[0]
        assert first.prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outputs[1:])
        assert [lp.token_id for lp in first.prompt_logprobs] == ids[1:]
        for pos, lp in enumerate(first.prompt_logprobs):
            assert abs(lp.logprob - float(expected[pos, ids[pos + 1]])) < 1e-4
            top = torch.topk(expected[pos], 3)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            assert max(abs(p - float(v)) for (_, p), v in zip(lp.top, top.values, strict=True)) < 1e-4
        assert sum(len(o.token_ids) for o in outputs) == max_tokens
        assert outputs[-1].finish_reason == "length" and outputs[-1].cached_tokens == 0
