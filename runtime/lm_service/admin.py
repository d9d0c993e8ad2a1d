"""Admin operations on one LM replica: abort, sleep, wake, update weights.

Two owners, one story:
- `Admission` (the replica's event loop) is the door. An operation that changes the engine's state
  (sleep, update weights) closes it first: requests that arrive meanwhile wait there, never reach
  the engine, and run after the operation ended (on the new weights), or are refused as
  "unavailable" (HTTP 503) if the engine now sleeps.
- `EngineAdmin` (the engine's step loop thread, in the replica or in the engine-core process)
  runs the operation between steps. Mode "drain": it waits until no request is live, so every
  request in flight finishes on the weights it started with; mode "abort": those requests end at
  once with finish_reason "abort". Either way, what they held (KV blocks, embeddings, vision
  references) is released by the engine as for any request that ends, and no request spans two
  weight versions or a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from runtime.errors import CheckpointError
from runtime.lm_service.engine_loop import EngineLoop
from runtime.protocol import AdminAbort, AdminOp, AdminResult, AdminSleep, AdminUpdateWeights, AdminWake, ErrorKind

log = logging.getLogger(__name__)

ASLEEP = "the LM replica is asleep (POST /admin/wake brings it back)"


class EngineAdmin:
    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def run(self, op: AdminOp, reply: Callable[[AdminResult], None]) -> None:
        """Any thread: start `op`; `reply` gets its result on the loop's thread when it ended."""
        started = time.perf_counter()
        self.loop.command(lambda: self._start(op, reply, started))

    def _start(self, op: AdminOp, reply: Callable[[AdminResult], None], started: float) -> None:
        if isinstance(op, AdminAbort):
            reply(self._result(started, aborted=self._abort(op.request_ids)))
        elif isinstance(op, AdminWake):
            self._finish(op, reply, started, 0)
        else:
            aborted = self._abort(None) if op.mode == "abort" else 0
            self.loop.when_idle(lambda: self._finish(op, reply, started, aborted))

    def _finish(self, op: AdminOp, reply: Callable[[AdminResult], None], started: float, aborted: int) -> None:
        engine = self.loop.engine
        try:
            if isinstance(op, AdminSleep):
                engine.sleep(op.level)
            elif isinstance(op, AdminWake):
                engine.wake()
            elif isinstance(op, AdminUpdateWeights):
                engine.load_weights(op.path, op.version)
        except (CheckpointError, OSError, ValueError) as e:  # the checkpoint does not fit: nothing changed
            log.warning("admin %s refused: %s", type(op).__name__, e)
            reply(self._result(started, aborted, f"{type(e).__name__}: {e}", ErrorKind.INVALID_REQUEST))
            return
        except Exception as e:
            log.exception("admin %s failed", type(op).__name__)
            reply(self._result(started, aborted, f"{type(e).__name__}: {e}", ErrorKind.INTERNAL))
            return
        log.info("admin %s done in %.3f s", type(op).__name__, time.perf_counter() - started)
        reply(self._result(started, aborted))

    def _abort(self, request_ids: list[str] | None) -> int:
        outputs = self.loop.engine.abort_requests(request_ids)
        if outputs:
            self.loop.deliver(outputs)
        return len(outputs)

    def _result(self, started: float, aborted: int = 0, error: str | None = None,
                error_type: ErrorKind | None = None) -> AdminResult:
        engine = self.loop.engine
        return AdminResult(ok=error is None, error=error, error_type=error_type, aborted=aborted,
                           sleep_level=engine.sleep_level, weights_version=engine.weights_version,
                           seconds=time.perf_counter() - started)


def reply_on(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future[AdminResult], Callable[[AdminResult], None]]:
    """A future of this event loop, and a callback any thread may call to resolve it."""
    future: asyncio.Future[AdminResult] = loop.create_future()

    def settle(result: AdminResult) -> None:
        if not future.done():  # the caller may have gone (cancelled)
            future.set_result(result)

    def reply(result: AdminResult) -> None:
        loop.call_soon_threadsafe(settle, result)

    return future, reply


class Admission:
    """The replica's door (its event loop only): closed while a sleep or a weight update runs, so
    that no new request reaches the engine in the middle of one; refusing while the engine sleeps."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._one_at_a_time = asyncio.Lock()
        self.sleep_level = 0

    async def enter(self) -> str | None:
        """Wait while the door is closed; then None (go ahead) or why the request is refused."""
        await self._open.wait()
        return ASLEEP if self.sleep_level else None

    async def run(self, op: AdminOp, execute: Callable[[AdminOp], Awaitable[AdminResult]]) -> AdminResult:
        async with self._one_at_a_time:
            closes = isinstance(op, AdminSleep | AdminUpdateWeights)
            if closes:
                self._open.clear()
            try:
                result = await execute(op)
                self.sleep_level = result.sleep_level  # before the door opens: waiters see it
            finally:
                self._open.set()
            return result
