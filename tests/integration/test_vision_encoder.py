"""The vision replica's encoder over real ZMQ: exact embeddings, cache hits, one encode for
concurrent asks, per-request errors for bad images, references released."""

from __future__ import annotations

import asyncio
import io
import logging
import queue

import pytest
import torch
from PIL import Image

from runtime.checkpoint.loader import load_vision
from runtime.images import image_key, load_processor_config, placeholder_count
from runtime.protocol import EncodeError
from runtime.settings import VisionConfig
from runtime.transport import EmbeddingInbox
from runtime.vision_service.encoder import ENCODE_FAILED, ImageInput, VisionEncoder
from runtime.vision_service.preprocess import decode_image, preprocess
from tests.integration.workload import png


@pytest.fixture()
def setup(checkpoints):
    path = checkpoints("tiny")
    got: queue.Queue = queue.Queue()
    inbox = EmbeddingInbox(lambda h, t: got.put((h, t.clone())), got.put)
    encoder = VisionEncoder(path, VisionConfig(max_wait_s=0.02), "vision-test")
    yield path, encoder, inbox, got
    encoder.close()
    inbox.close()


def _key(path, data: bytes) -> str:
    return image_key(data, load_processor_config(path), path, "float32")


def _input(path, data: bytes) -> ImageInput:
    im = decode_image(data)
    return ImageInput(data, placeholder_count(im.height, im.width, load_processor_config(path)), _key(path, data))


def _drain(got: queue.Queue, n: int) -> list:
    return [got.get(timeout=10) for _ in range(n)]


def test_embeddings_equal_the_tower_in_process_and_repeats_hit(setup) -> None:
    path, encoder, inbox, got = setup
    image = png(140, 112, seed=1)
    assert asyncio.run(encoder.encode("r1", [_input(path, image)], inbox.address)) == 1
    (header, received), = _drain(got, 1)
    pixels, grid = preprocess(decode_image(image), load_processor_config(path))
    with torch.inference_mode():
        expected = load_vision(path)(pixels, [grid])[0]
    assert torch.equal(received, expected) and header.request_id == "r1" and header.sender == "vision-test"

    batches = len(encoder._batcher.batch_sizes)
    asyncio.run(encoder.encode("r2", [_input(path, image)], inbox.address))
    (_, again), = _drain(got, 1)
    assert torch.equal(again, expected) and len(encoder._batcher.batch_sizes) == batches, "hit must not encode"
    assert encoder.cache.stats().hits == 1 and encoder.cache.stats().live_references == 2
    encoder.release("r1")
    encoder.release("r2")
    assert encoder.cache.stats().live_references == 0


def test_concurrent_requests_share_one_encode_and_batch_together(setup) -> None:
    path, encoder, inbox, got = setup
    shared = _input(path, png(56, 84, seed=2))
    others = [_input(path, png(84, 56, seed=3 + i)) for i in range(3)]

    async def main() -> None:
        await asyncio.gather(encoder.encode("a", [shared, others[0]], inbox.address),
                             encoder.encode("b", [shared, others[1]], inbox.address),
                             encoder.encode("c", [others[2]], inbox.address))

    asyncio.run(main())
    assert len(_drain(got, 5)) == 5
    stats = encoder.cache.stats()
    assert stats.misses == 4 and stats.hits == 1, "the shared image is encoded once"
    assert max(encoder._batcher.batch_sizes) > 1, "images from different requests batch together"


def _bad_images(path) -> dict[str, ImageInput]:
    good = png(56, 56, seed=9)
    huge = io.BytesIO()
    Image.new("L", (8000, 6000)).save(huge, format="PNG")
    return {
        "not an image": ImageInput(b"hello, world", 4, _key(path, b"hello, world")),
        "truncated": ImageInput(good[: len(good) // 2], 4, _key(path, good[: len(good) // 2])),
        "too many pixels": ImageInput(huge.getvalue(), 4, _key(path, huge.getvalue())),
        "wrong placeholder count": ImageInput(good, 999, _key(path, good)),
    }


def test_bad_images_fail_their_request_alone(checkpoints, setup) -> None:
    path, _, inbox, got = setup
    encoder = VisionEncoder(path, VisionConfig(max_pixels=10_000_000), "vision-bad")
    try:
        for name, bad in _bad_images(path).items():
            ok = _input(path, png(56, 56, seed=10))
            assert asyncio.run(encoder.encode(name, [bad, ok], inbox.address)) == 1, name
            messages = _drain(got, 2)
            errors = [m for m in messages if isinstance(m, EncodeError)]
            assert len(errors) == 1 and errors[0].request_id == name and errors[0].image_index == 0, name
            assert errors[0].error_type in ("invalid_image", "image_too_large"), name
            encoder.release(name)
        tiny_budget = VisionEncoder(path, VisionConfig(cache_mb=100 / 2**20), "vision-small")
        assert asyncio.run(tiny_budget.encode("big", [_input(path, png(56, 56, seed=11))], inbox.address)) == 0
        (error,) = _drain(got, 1)
        assert error.error_type == "image_too_large" and "budget" in error.message
        tiny_budget.close()
    finally:
        encoder.close()
    assert encoder.cache.stats().live_references == 0


def test_a_broken_tower_fails_the_image_without_its_text_and_logs_the_traceback(setup, caplog) -> None:
    path, encoder, inbox, got = setup

    def broken(pixels, grids):
        raise RuntimeError("secret internal detail")

    encoder.tower = broken
    with caplog.at_level(logging.INFO, logger="runtime"):
        assert asyncio.run(encoder.encode("r-broken", [_input(path, png(140, 112, seed=3))], inbox.address)) == 0
    error, = _drain(got, 1)
    assert isinstance(error, EncodeError) and error.error_type == "internal" and error.message == ENCODE_FAILED
    assert "secret" not in error.message
    assert any(r.exc_info and r.getMessage() == "r-broken: image 0 failed to encode" for r in caplog.records)
    assert "secret internal detail" in caplog.text
    assert encoder.cache.stats().live_references == 0
