"""The LM pool and the vision pool together on a real local Ray cluster and Serve: image embeddings
travel over real ZMQ, releases travel back, and nothing stays referenced afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray import serve

from runtime.protocol import GenerateRequest, ImagePayload, SamplingParams
from runtime.router.prepare import RequestPreparer
from runtime.settings import EngineConfig, VisionClientConfig, VisionConfig
from tests.integration.workload import chat, mixed, png, reference_inputs
from tests.reference import reference_greedy, reference_model

# Small: a busy replica preempts. Each output streamed alone.
ENGINE = EngineConfig(num_blocks=40, block_size=8, max_num_seqs=8, stream_interval_ms=0)


@pytest.fixture(scope="module")
def app(checkpoints):
    from runtime.lm_service.deployment import LMService
    from runtime.vision_service.deployment import VisionService

    path = checkpoints("tiny")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    vision = VisionService.options(num_replicas=1).bind(str(path), VisionConfig(max_wait_s=0.01), "127.0.0.1")
    lm = LMService.options(num_replicas=1).bind(str(path), ENGINE, vision, "127.0.0.1",
                                                 VisionClientConfig(arrival_timeout_s=20))
    handle = serve.run(lm, name="lm", route_prefix=None)
    yield path, handle, serve.get_deployment_handle("VisionService", app_name="lm")
    serve.shutdown()
    ray.shutdown()


def _collect(handle, request: GenerateRequest, leave_after: int | None = None) -> dict:
    """Stream one request; with leave_after, stop reading after that many tokens (the client leaves)."""
    stream = handle.options(stream=True).generate.remote(request)
    tokens, text, last = [], "", None
    for out in stream:
        tokens += out.token_ids
        text += out.text
        last = out
        if leave_after is not None and len(tokens) >= leave_after:
            stream.cancel()
            break
    return {"tokens": tokens, "text": text, "reason": last.finish_reason, "error": last.error,
            "error_type": last.error_type}


def _drained(lm, vision, timeout_s: float = 20) -> tuple[dict, dict]:
    """Stats once nothing is referenced any more (or as they are at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lm_stats = lm.stats.remote().result(timeout_s=30)
        cache = vision.stats.remote().result(timeout_s=30)["cache"]
        idle = (cache["live_references"] == 0 and lm_stats["engine"]["kv_blocks_used"] == 0
                and lm_stats["vision_client"]["requests"] == 0)
        if idle or time.monotonic() > deadline:
            return lm_stats, cache
        time.sleep(0.1)


def test_image_requests_through_both_pools_equal_transformers(app) -> None:
    path, lm, vision = app
    prep = RequestPreparer(path, "float32", trust_remote_code=False)
    ref = reference_model(str(path))
    requests = [r for r in mixed(8, seed=5) if r.images][:3]
    assert requests
    for i, r in enumerate(requests):
        got = _collect(lm, prep.prepare(f"ref-{i}", r))
        expected, _ = reference_greedy(ref, reference_inputs(prep, r), r.sampling.max_tokens or 0)
        assert got["tokens"] == expected and got["reason"] == "length"
        assert got["text"] == prep.tokenizer.decode(expected, skip_special_tokens=True)
    _drained(lm, vision)
    before = vision.stats.remote().result(timeout_s=30)["cache"]
    again = _collect(lm, prep.prepare("again", requests[0]))  # the same image: a cache hit
    after = vision.stats.remote().result(timeout_s=30)["cache"]
    assert again["reason"] == "length"
    assert after["hits"] - before["hits"] == len(requests[0].images) and after["misses"] == before["misses"]


def test_mixed_workload_with_aborts_and_failures_leaves_nothing_referenced(app) -> None:
    path, lm, vision = app
    prep = RequestPreparer(path, "float32", trust_remote_code=False)
    requests = mixed(16, seed=9, max_tokens=(8, 16))
    shared = png(112, 84, seed=77)  # several requests share one image
    requests += [chat(f"describe {k}", [shared], requests[0].sampling) for k in range(4)]
    expected = {f"w{i}": _collect(lm, prep.prepare(f"solo-{i}", r)) for i, r in enumerate(requests)}
    _drained(lm, vision)

    # Long text-only decodes first: three of them at once outgrow the 40 blocks, so the workload
    # preempts (and re-encodes the preempted requests' images) however the others interleave.
    hog = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    jobs = [(f"hog{k}", prep.prepare(f"hog{k}", chat(f"keep going {k}", [], hog)), None) for k in range(5)]
    jobs += [(f"w{i}", prep.prepare(f"w{i}", r), None) for i, r in enumerate(requests)]
    jobs += [(f"leave{k}", prep.prepare(f"leave{k}", requests[k]), 2) for k in range(1, 4)]
    bad = prep.prepare("bad", requests[-1])  # one image; its header is fine, its pixels are not
    truncated = shared[: len(shared) // 2]
    bad_image = ImagePayload(truncated, bad.images[0].placeholders, prep.image_key(truncated))
    jobs.append(("bad", GenerateRequest("bad", bad.prompt_ids, bad.sampling, [bad_image]), None))
    long = GenerateRequest("long", [1] * 5000, requests[0].sampling)  # more than the engine can ever hold
    jobs.append(("long", long, None))
    before = lm.stats.remote().result(timeout_s=30)["engine"]["preemptions"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = dict(zip([j[0] for j in jobs], pool.map(lambda j: _collect(lm, j[1], j[2]), jobs), strict=True))

    for key, want in expected.items():
        assert results[key]["tokens"] == want["tokens"], f"{key} differs when run concurrently"
    assert all(len(results[f"hog{k}"]["tokens"]) == 120 for k in range(5))
    for k in range(1, 4):
        assert results[f"leave{k}"]["tokens"] == expected[f"w{k}"]["tokens"][:len(results[f'leave{k}']['tokens'])]
    assert results["bad"]["reason"] == "error" and results["bad"]["error_type"] == "invalid_request"
    assert "image 0" in results["bad"]["error"]
    assert results["long"]["reason"] == "error" and results["long"]["error_type"] == "invalid_request"

    lm_stats, cache = _drained(lm, vision)
    assert cache["live_references"] == 0 and lm_stats["vision_client"]["requests"] == 0
    assert lm_stats["engine"]["kv_blocks_used"] == 0 and lm_stats["engine"]["running"] == 0
    assert lm_stats["vision_client"]["releases_dropped"] == 0
    assert lm_stats["engine"]["preemptions"] > before, "the workload was meant to preempt (re-encode path)"


@serve.deployment(name="LateVision", ray_actor_options={"num_cpus": 0})
class LateVision:
    """A vision pool whose embeddings are lost on the way (delay_s=None) or arrive late: it answers
    `encode` at once, and pushes correctly shaped embeddings only after delay_s."""

    def __init__(self, hidden: int, delay_s: float | None):
        import asyncio

        from runtime.transport import EmbeddingSender

        self.hidden, self.delay_s, self.asyncio = hidden, delay_s, asyncio
        self.sender = EmbeddingSender("tcp://127.0.0.1:9")  # nothing listens there: releases are not its concern

    async def encode(self, request):
        import torch

        from runtime.protocol import EncodeAccepted

        async def push_later() -> None:
            await self.asyncio.sleep(self.delay_s)
            for index, image in zip(request.indexes(), request.images, strict=True):
                self.sender.send_embeddings(request.reply_to, request.request_id, index, "k",
                                            torch.zeros(image.placeholders, self.hidden))

        if self.delay_s is not None:
            self.asyncio.get_running_loop().create_task(push_later())
        return EncodeAccepted(self.sender.sender_id, len(request.images))


@pytest.mark.parametrize("delay_s", [None, 3.0], ids=["dropped", "late"])
def test_lost_or_late_embeddings_fail_the_request_with_a_timeout(app, delay_s) -> None:
    from runtime.lm_service.deployment import LMService

    path, _, _ = app
    prep = RequestPreparer(path, "float32", trust_remote_code=False)
    name = f"lm-lossy-{'late' if delay_s else 'dropped'}"
    handle = serve.run(LMService.options(name="LMLossy", ray_actor_options={"num_cpus": 0}).bind(
        str(path), ENGINE, LateVision.bind(64, delay_s), "127.0.0.1", VisionClientConfig(arrival_timeout_s=1.0)),
        name=name, route_prefix=None)
    try:
        request = prep.prepare("lossy", chat("x", [png(56, 56, seed=1)], mixed(1)[0].sampling))
        got = _collect(handle, request)
        assert got["reason"] == "error" and got["error_type"] == "timeout"
        assert "did not arrive within 1.0 s" in got["error"]
        time.sleep((delay_s or 0) + 0.5)  # a late message lands after the request is gone
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["engine"]["kv_blocks_used"] == 0 and stats["vision_client"]["requests"] == 0
        assert stats["vision_client"]["arrival_timeouts"] == 1
        assert stats["engine"]["dropped_embeddings"] == (len(request.images) if delay_s else 0)
    finally:
        serve.delete(name)
