"""The vision batcher: what queued while the tower ran is the next batch; max_wait_s only adds company."""

from __future__ import annotations

import asyncio
import threading

import torch

from runtime.vision_service.encoder import _Batcher


class _Tower:
    """Stands in for the tower: returns each image's own pixels; can be held inside a run."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()

    def __call__(self, pixels: list[torch.Tensor], grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        self.running.set()
        self.hold.wait(5)
        return pixels


async def _while_busy(batcher: _Batcher, tower: _Tower, later: int) -> list[torch.Tensor]:
    """One image starts a run that is held; `later` more arrive while it runs; then it is let go."""
    tower.hold.clear()
    first = asyncio.ensure_future(batcher.submit(torch.tensor([0.0]), (1, 1)))
    await asyncio.to_thread(tower.running.wait, 5)
    rest = [asyncio.ensure_future(batcher.submit(torch.tensor([float(i)]), (1, 1))) for i in range(1, later + 1)]
    await asyncio.sleep(0.05)  # all of them queued behind the held run
    tower.hold.set()
    return list(await asyncio.gather(first, *rest))


def test_images_that_arrive_during_a_run_form_the_next_batch_at_once() -> None:
    tower = _Tower()
    batcher = _Batcher(tower, max_batch=16, max_wait_s=0.0)
    outs = asyncio.run(_while_busy(batcher, tower, later=5))
    assert batcher.batch_sizes == [1, 5]
    assert [o.item() for o in outs] == [0, 1, 2, 3, 4, 5], "each caller gets its own image's output"


def test_a_batch_never_exceeds_max_batch() -> None:
    tower = _Tower()
    batcher = _Batcher(tower, max_batch=4, max_wait_s=0.0)
    asyncio.run(_while_busy(batcher, tower, later=7))
    assert batcher.batch_sizes == [1, 4, 3]


def test_max_wait_gathers_an_image_that_comes_soon_after() -> None:
    batcher = _Batcher(_Tower(), max_batch=16, max_wait_s=1.0)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(torch.tensor([0.0]), (1, 1)))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, batcher.submit(torch.tensor([1.0]), (1, 1)))

    asyncio.run(main())
    assert batcher.batch_sizes == [2]


def test_a_vision_replica_takes_at_least_a_full_batch_of_encode_calls_at_once() -> None:
    """The batcher batches only the calls its replica holds: Serve's default of 5 ongoing requests
    capped every batch at 5 images, whatever max_batch said."""
    from runtime.settings import VisionConfig
    from runtime.vision_service.deployment import VisionService

    assert VisionService.max_ongoing_requests >= VisionConfig().max_batch  # type: ignore[attr-defined]
