"""The vision pool on a real local Ray cluster and Serve, with real ZMQ to an in-test LM inbox."""

from __future__ import annotations

import contextlib
import queue
import time

import pytest
import ray
import torch
from ray import serve

from runtime.checkpoint.loader import load_vision
from runtime.images import image_key, load_processor_config, placeholder_count
from runtime.protocol import EncodeError, EncodeRequest, ImagePayload
from runtime.settings import VisionConfig
from runtime.transport import EmbeddingInbox, EmbeddingSender
from runtime.vision_service.preprocess import decode_image, preprocess
from tests.integration.workload import png


@pytest.fixture(scope="module")
def vision_app(checkpoints):
    from runtime.vision_service.deployment import VisionService

    path = checkpoints("tiny")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    handle = serve.run(VisionService.options(num_replicas=1).bind(str(path), VisionConfig(max_wait_s=0.01),
                                                                   "127.0.0.1"),
                       name="vision", route_prefix=None)
    yield path, handle
    serve.shutdown()
    ray.shutdown()


def _key(path, data: bytes) -> str:
    return image_key(data, load_processor_config(path), path, "float32")


def _payload(path, data: bytes) -> ImagePayload:
    im = decode_image(data)
    return ImagePayload(data, placeholder_count(im.height, im.width, load_processor_config(path)), _key(path, data))


def _release_and_count_live(handle, sender: EmbeddingSender, releases: list[tuple[str, str]]) -> int:
    """Push each (address, request_id) release over ZMQ; wait up to 10 s for the references to drain."""
    for address, request_id in releases:
        sender.send_release(address, request_id)
    deadline = time.monotonic() + 10
    while (live := handle.stats.remote().result(timeout_s=30)["cache"]["live_references"]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    return live


@contextlib.contextmanager
def _lm_side(name: str):
    """What an LM replica has: an inbox (embeddings and errors land in the queue) and a sender for releases."""
    got: queue.Queue = queue.Queue()
    inbox = EmbeddingInbox(lambda h, t: got.put((h, t.clone())), got.put)
    sender = EmbeddingSender(name)
    try:
        yield got, inbox, sender
    finally:
        sender.close()
        inbox.close()


def test_encode_push_release_through_serve(vision_app) -> None:
    path, handle = vision_app
    with _lm_side("lm-test") as (got, inbox, sender):
        image = png(140, 112, seed=21)
        junk = ImagePayload(b"junk", 4, _key(path, b"junk"))
        request = EncodeRequest("req-1", [_payload(path, image), junk], inbox.address)
        accepted = handle.encode.remote(request).result(timeout_s=60)
        messages = [got.get(timeout=30) for _ in range(2)]
        header, received = next(m for m in messages if not isinstance(m, EncodeError))
        error = next(m for m in messages if isinstance(m, EncodeError))
        assert accepted.encoded == 1 and header.sender == accepted.sender
        assert error.request_id == "req-1" and error.image_index == 1 and error.error_type == "invalid_image"
        pixels, grid = preprocess(decode_image(image), load_processor_config(path))
        with torch.inference_mode():
            assert torch.equal(received, load_vision(path)(pixels, [grid])[0])

        again = handle.encode.remote(EncodeRequest("req-2", [_payload(path, image)], inbox.address))
        assert again.result(timeout_s=60).encoded == 1 and got.get(timeout=30)[0].request_id == "req-2"
        stats = handle.stats.remote().result(timeout_s=30)["cache"]
        assert stats["hits"] == 1 and stats["misses"] == 2 and stats["live_references"] == 2  # junk was a miss too

        assert _release_and_count_live(handle, sender, [(accepted.sender, "req-1"), (accepted.sender, "req-2")]) == 0


def test_concurrent_requests_for_one_new_image_encode_once_through_serve(vision_app) -> None:
    path, handle = vision_app
    with _lm_side("lm-test-2") as (got, inbox, sender):
        before = handle.stats.remote().result(timeout_s=30)["cache"]
        image = _payload(path, png(84, 84, seed=31))
        responses = [handle.encode.remote(EncodeRequest(f"c{i}", [image], inbox.address)) for i in range(4)]
        accepted = [r.result(timeout_s=60) for r in responses]
        tensors = [got.get(timeout=30)[1] for _ in range(4)]
        after = handle.stats.remote().result(timeout_s=30)["cache"]
        assert after["misses"] - before["misses"] == 1 and after["hits"] - before["hits"] == 3
        assert all(torch.equal(t, tensors[0]) for t in tensors)
        assert _release_and_count_live(handle, sender, [(a.sender, f"c{i}") for i, a in enumerate(accepted)]) == 0


def test_small_budget_is_never_exceeded_and_lost_releases_expire(vision_app) -> None:
    """A second app with a 3-image byte budget and a 1 s lease: references whose release never
    comes are reclaimed, the cache stays within budget, and an image bigger than the budget is refused."""
    from runtime.vision_service.deployment import VisionService

    path, _ = vision_app
    one = 9 * 64 * 4  # an 84x84 image: 9 tokens of the tiny model's hidden size 64, float32
    small = serve.run(VisionService.options(name="VisionSmall").bind(
        str(path), VisionConfig(cache_mb=(3 * one + 100) / 2**20, lease_s=1.0, max_wait_s=0.0), "127.0.0.1"),
        name="vision-small", route_prefix=None)
    got: queue.Queue = queue.Queue()
    inbox = EmbeddingInbox(lambda h, t: got.put(h), got.put)
    sender = EmbeddingSender("lm-small")
    try:
        def encode(request_id: str, seed: int, size: tuple[int, int] = (84, 84)):
            accepted = small.encode.remote(EncodeRequest(request_id, [_payload(path, png(*size, seed=seed))],
                                                         inbox.address)).result(timeout_s=60)
            stats = small.stats.remote().result(timeout_s=30)["cache"]
            assert stats["bytes"] <= stats["budget_bytes"]
            return accepted, got.get(timeout=30), stats

        held = [encode(f"held{i}", 100 + i) for i in range(6)]  # never released (a crashed LM replica)
        assert all(not isinstance(message, EncodeError) for _, message, _ in held)
        # three fit; the other three were pushed without being kept (nothing unreferenced to evict)
        assert held[-1][2]["live_references"] == 3 and held[-1][2]["bypasses"] == 3
        time.sleep(1.5)
        stats = small.stats.remote().result(timeout_s=30)["cache"]
        assert stats["live_references"] == 0 and stats["expired_leases"] == 3

        for i in range(6):
            accepted, _, _ = encode(f"released{i}", 200 + i)
            sender.send_release(accepted.sender, f"released{i}")
            time.sleep(0.05)  # the release lands before the next request
        stats = small.stats.remote().result(timeout_s=30)["cache"]
        assert stats["evictions"] >= 3 and stats["entries"] <= 3

        _, message, _ = encode("huge", 300, size=(500, 300))
        assert isinstance(message, EncodeError) and message.error_type == "image_too_large"
    finally:
        sender.close()
        inbox.close()
        serve.delete("vision-small")
