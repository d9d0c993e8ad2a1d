"""The engine's async face: a step loop on its own thread, one output stream per request.

Callers on any asyncio loop add requests and iterate their outputs; leaving the iteration early
(client gone, task cancelled) aborts the request, which frees everything it held. Callers never
wait for a step: everything goes through the loop's command queue (runtime.lm_service.engine_loop).
With an inbox, vision replicas push embeddings (and encode errors) to it, and its thread queues them
for the loop like any other command.
The engine-core process (runtime.lm_service.engine_client) offers the same face across a process
boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import torch

from runtime.lm_service.admin import EngineAdmin, reply_on
from runtime.lm_service.engine import Engine, EngineStats
from runtime.lm_service.engine_loop import EngineDeadError, EngineLoop, encode_failure
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import AdminOp, AdminResult, EmbeddingHeader, EncodeError, ErrorKind, RequestOutput, merge_outputs
from runtime.transport import EmbeddingInbox

__all__ = ["AsyncEngine", "EngineDeadError", "OutputStreams", "merge_outputs"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


class OutputStreams:
    """Per-request asyncio queues fed from another thread, read as async iterators.

    `deliver` (any thread) hands each event loop its batch in one call_soon_threadsafe, so a step's
    outputs wake a loop once, not once per request. A reader that leaves early calls `on_leave`."""

    def __init__(self, on_leave: Callable[[str], None]):
        self.on_leave = on_leave
        self._streams: dict[str, _Stream] = {}

    def open(self, request_id: str, interval_s: float) -> AsyncIterator[RequestOutput]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        return self._read(request_id, stream, interval_s)

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def deliver(self, outputs: list[RequestOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def live(self) -> list[str]:
        return list(self._streams)

    async def _read(self, request_id: str, stream: _Stream, interval_s: float) -> AsyncIterator[RequestOutput]:
        """With interval_s > 0, outputs after the first are merged over that interval: fewer, larger
        messages for a reader across a process boundary (each costs an RPC), at the price of
        burstier inter-token gaps. The first token is never held back."""
        finished, last_yield = False, None
        loop = asyncio.get_running_loop()
        try:
            while not finished:
                outs = [await stream.queue.get()]
                if last_yield is not None and not outs[0].finished:
                    wait = last_yield + interval_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                while not stream.queue.empty():  # a slow reader gets what piled up as one output
                    outs.append(stream.queue.get_nowait())
                out = merge_outputs(outs)
                finished = out.finished
                last_yield = loop.time()
                yield out
        finally:
            if not finished:  # the reader left early (client gone, task cancelled)
                self.close(request_id)
                self.on_leave(request_id)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in batch:
        queue.put_nowait(out)


class AsyncEngine:
    """An engine stepped on a thread of this process; with `inbox_host`, its embedding inbox binds there."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05, inbox_host: str | None = None):
        self.engine = engine
        self.streams = OutputStreams(self.abort)
        self.loop = EngineLoop(engine, self.streams.deliver, idle_wait_s=idle_wait_s)
        self.admin_ops = EngineAdmin(self.loop)
        self.inbox = EmbeddingInbox(self._arrived, self._failed, inbox_host) if inbox_host is not None else None
        self.loop.start()

    @property
    def inbox_address(self) -> str:
        """Where vision replicas push this engine's embeddings (the `reply_to` of its encode calls)."""
        if self.inbox is None:
            raise RuntimeError("this engine has no embedding inbox")
        return self.inbox.address

    @property
    def malformed_messages(self) -> int:
        return self.inbox.malformed if self.inbox is not None else 0

    @property
    def error(self) -> BaseException | None:
        return self.loop.error

    def add_request(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]] = (),
                    stream_interval_s: float | None = None,
                    reply_to: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue the request (RequestError now if it can never run, EngineDeadError if the loop
        died) and return its output stream. Must be called on the asyncio loop that will read it.
        stream_interval_s defaults to the engine config's (see OutputStreams._read). reply_to is
        not used: a replica that steps its engine itself streams every output (the router reads both)."""
        self.loop.check_alive()
        self.engine.check(request)
        interval = self.engine.config.stream_interval_s if stream_interval_s is None else stream_interval_s
        stream = self.streams.open(request.request_id, interval)
        self.loop.admit(request, embeddings)
        return stream

    async def generate(self, request: EngineRequest,
                       embeddings: Sequence[tuple[int, torch.Tensor]] = ()) -> AsyncIterator[RequestOutput]:
        """Queue the request and yield its outputs until the finished one."""
        async for out in self.add_request(request, embeddings):
            yield out

    def add_embeddings(self, request_id: str, image_index: int, tensor: torch.Tensor) -> None:
        self.loop.add_embeddings(request_id, image_index, tensor)

    def fail(self, request_id: str, message: str, error_type: ErrorKind = ErrorKind.INTERNAL) -> None:
        self.loop.fail(request_id, message, error_type)

    def _arrived(self, header: EmbeddingHeader, tensor: torch.Tensor) -> None:  # the inbox's thread
        self.loop.add_embeddings(header.request_id, header.image_index, tensor)

    def _failed(self, error: EncodeError) -> None:  # the inbox's thread
        self.loop.fail(error.request_id, *encode_failure(error))

    def when_missing(self, request_id: str, indexes: list[int], reply: Callable[[list[int]], None]) -> None:
        self.loop.when_missing(request_id, indexes, reply)

    def abort(self, request_id: str) -> None:
        self.streams.close(request_id)
        self.loop.abort(request_id)

    async def admin(self, op: AdminOp) -> AdminResult:
        """Run an admin operation between steps (runtime.lm_service.admin); its result when it ended."""
        self.loop.check_alive()
        future, reply = reply_on(asyncio.get_running_loop())
        self.admin_ops.run(op, reply)
        return await future

    def stats(self) -> EngineStats:
        return self.loop.stats()

    def close(self) -> None:
        if self.inbox is not None:
            self.inbox.close()
        self.loop.close()
