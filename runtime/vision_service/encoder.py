"""The vision replica's work, without Ray: decode, preprocess, batched MoonViT, cache, push.

`VisionEncoder.encode(request_id, images, reply_to)` looks each image up in the embedding cache
(one encode per content key, however many requests ask at once), encodes misses in batches that
gather images from concurrent requests (at most max_batch images, waiting at most max_wait_s for
company), and pushes each image's embeddings to reply_to. A bad image becomes a typed EncodeError
pushed to reply_to for that request; the service stays healthy. `release(request_id)` drops the
request's cache references. Decoding and the model run in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.cache.embedding_cache import EmbeddingCache, EmbeddingTooLargeError
from runtime.checkpoint.loader import load_vision
from runtime.errors import ImageError, ImageKeyMismatchError, ImageTooLargeError
from runtime.images import ImageLimits, image_key, load_processor_config, placeholder_count
from runtime.models.config import load_model_config
from runtime.protocol import ErrorKind
from runtime.settings import VisionConfig
from runtime.transport import EmbeddingSender
from runtime.vision_service.preprocess import decode_image, preprocess

log = logging.getLogger(__name__)
# What a request hears when encoding its image failed on our side: the traceback is in our log.
ENCODE_FAILED = "the vision pool failed to encode this image; the vision replica's log has the details"


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    placeholders: int  # the router's count (placeholder_count); checked against ours
    key: str  # the router's image_key; checked against ours before the cache trusts it


class _Batcher:
    """Collects images from concurrent callers and runs the tower once per batch."""

    def __init__(self, run_batch, max_batch: int, max_wait_s: float):
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self._queue: asyncio.Queue[tuple[torch.Tensor, tuple[int, int], asyncio.Future]] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []

    async def submit(self, pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        await self._queue.put((pixels, grid, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            self.batch_sizes.append(len(batch))
            try:
                outs = await asyncio.to_thread(self.run_batch, [b[0] for b in batch], [b[1] for b in batch])
                for (_, _, future), out in zip(batch, outs, strict=True):
                    if not future.done():
                        future.set_result(out)
            except Exception as e:  # the whole batch failed: every waiter hears why (and logs its request)
                log.exception("the vision tower failed on a batch of %d images", len(batch))
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(e)

    async def _next_batch(self) -> list[tuple[torch.Tensor, tuple[int, int], asyncio.Future]]:
        """Everything queued (up to max_batch): what arrived while the tower ran is the batch.
        Then, while max_wait_s since the first image has not passed, whatever else arrives."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), timeout))
            except TimeoutError:
                break
        return batch


class VisionEncoder:
    def __init__(self, model_dir: str | Path, config: VisionConfig, sender_id: str,
                 sender: EmbeddingSender | None = None):
        self.config = config
        model_config = load_model_config(model_dir)
        self.processor = load_processor_config(model_dir)
        self.dtype = config.torch_dtype
        self.tower = load_vision(model_dir, model_config, self.dtype, config.device)
        self.hidden = model_config.text.hidden_size
        self.limits: ImageLimits = config  # a VisionConfig is its own ImageLimits
        self.cache: EmbeddingCache[torch.Tensor] = EmbeddingCache(config.cache_bytes, config.lease_s)
        self.sender = sender or EmbeddingSender(sender_id)
        self.model_dir = model_dir
        self._batcher = _Batcher(self._run_tower, config.max_batch, config.max_wait_s)

    @torch.inference_mode()
    def _run_tower(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        return self.tower(torch.cat(pixels).to(self.config.device, self.dtype), grids)

    async def encode(self, request_id: str, images: list[ImageInput], reply_to: str,
                     indexes: list[int] | None = None) -> int:
        """Push every image's embeddings (or its error) to reply_to; return how many succeeded.
        `indexes` are the images' indexes within the request (default 0..n-1)."""
        indexes = list(range(len(images))) if indexes is None else indexes
        results = await asyncio.gather(*(self._encode_one(request_id, i, image, reply_to)
                                         for i, image in zip(indexes, images, strict=True)))
        return sum(results)

    def _checked_key(self, image: ImageInput) -> str:
        """The carried key, once the bytes are shown to hash to it: the cache must never hand one
        image's embeddings to another's bytes (a router with another processor config, model path
        or dtype than ours computes other keys)."""
        ours = image_key(image.data, self.processor, self.model_dir, self.config.dtype)
        if image.key != ours:
            raise ImageKeyMismatchError(image.key, ours)
        return ours

    async def _encode_one(self, request_id: str, index: int, image: ImageInput, reply_to: str) -> bool:
        nbytes = image.placeholders * self.hidden * self.dtype.itemsize
        try:
            key = self._checked_key(image)
            embeds = await self.cache.get_or_compute(request_id, key, nbytes, lambda: self._compute(image))
        except ImageKeyMismatchError as e:  # our peers disagree with us, not the client's fault
            log.error("%s: image %d: %s", request_id, index, e)
            self.sender.send_error(reply_to, request_id, index, ENCODE_FAILED, ErrorKind.INTERNAL)
            return False
        except (EmbeddingTooLargeError, ImageTooLargeError) as e:
            log.info("%s: image %d refused: %s", request_id, index, e)
            self.sender.send_error(reply_to, request_id, index, str(e), ErrorKind.IMAGE_TOO_LARGE)
            return False
        except ImageError as e:
            log.info("%s: image %d refused: %s", request_id, index, e)
            self.sender.send_error(reply_to, request_id, index, str(e), ErrorKind.INVALID_IMAGE)
            return False
        except Exception:  # a bug or a broken tower: this request fails, the replica lives on
            log.exception("%s: image %d failed to encode", request_id, index)
            self.sender.send_error(reply_to, request_id, index, ENCODE_FAILED, ErrorKind.INTERNAL)
            return False
        self.sender.send_embeddings(reply_to, request_id, index, key, embeds)
        return True

    async def _compute(self, image: ImageInput) -> torch.Tensor:
        pixels, grid = await asyncio.to_thread(self._prepare, image)
        return await self._batcher.submit(pixels, grid)

    def _prepare(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int]]:
        decoded = decode_image(image.data, self.limits)
        expected = placeholder_count(decoded.height, decoded.width, self.processor)
        if expected != image.placeholders:
            raise ImageError(f"the request reserved {image.placeholders} image tokens; this image needs {expected}")
        return preprocess(decoded, self.processor)

    def release(self, request_id: str) -> int:
        return self.cache.release(request_id)

    def close(self) -> None:
        self.sender.close()
