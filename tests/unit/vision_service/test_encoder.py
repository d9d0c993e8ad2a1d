"""VisionEncoder trusts no carried key: a key its bytes do not hash to fails that image's request."""

from __future__ import annotations

import asyncio

from runtime.images import image_key, load_processor_config, placeholder_count
from runtime.settings import VisionConfig
from runtime.vision_service.encoder import ENCODE_FAILED, ImageInput, VisionEncoder
from runtime.vision_service.preprocess import decode_image
from tests.integration.workload import png


class _Recorder:
    """Stands in for the ZMQ sender: what would have been pushed to each request."""

    def __init__(self) -> None:
        self.embeddings: list[tuple[str, int, str]] = []
        self.errors: list[tuple[str, int, str, str]] = []

    def send_embeddings(self, address: str, request_id: str, index: int, key: str, embeds) -> None:
        self.embeddings.append((request_id, index, key))

    def send_error(self, address: str, request_id: str, index: int, message: str, error_type: str) -> None:
        self.errors.append((request_id, index, message, error_type))

    def close(self) -> None:
        pass


def _input(path, data: bytes, key: str | None = None) -> ImageInput:
    processor = load_processor_config(path)
    im = decode_image(data)
    return ImageInput(data, placeholder_count(im.height, im.width, processor),
                      key if key is not None else image_key(data, processor, path, "float32"))


def test_a_key_other_than_the_bytes_fails_that_request_only(checkpoints, caplog) -> None:
    path = checkpoints("tiny")
    sent = _Recorder()
    encoder = VisionEncoder(path, VisionConfig(max_wait_s=0.0), "vision-unit", sender=sent)  # type: ignore[arg-type]
    good, other = png(56, 56, seed=1), png(56, 84, seed=2)
    forged = _input(path, good, key=image_key(other, load_processor_config(path), path, "float32"))

    async def main() -> list[int]:
        return list(await asyncio.gather(encoder.encode("forged", [forged], "lm"),
                                         encoder.encode("fine", [_input(path, other)], "lm")))

    assert asyncio.run(main()) == [0, 1]
    (request_id, index, message, kind), = sent.errors
    assert (request_id, index, kind, message) == ("forged", 0, "internal", ENCODE_FAILED)  # no internals
    assert any("forged" in r.getMessage() and "content key" in r.getMessage() for r in caplog.records)
    assert [e[0] for e in sent.embeddings] == ["fine"]
    # The forged key never reached the cache: the other image's entry was computed for its own bytes.
    assert encoder.cache.stats().misses == 1 and encoder.cache.stats().live_references == 1
    encoder.close()
