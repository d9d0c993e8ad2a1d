"""The engine's async face: a step loop on its own thread, one output stream per request.

Callers on any asyncio loop add requests and iterate their outputs; leaving the iteration early
(client gone, task cancelled) aborts the request, which frees everything it held.

The engine stays single-threaded without making callers wait for a step: requests, embeddings,
aborts and failures are queued as commands that the step loop applies between steps, and stats
are a snapshot the loop refreshes. A caller on the event loop therefore never blocks for the length
of a forward (that stalled every stream of the replica, and the step thread then waited for the GIL).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import msgspec
import torch

from runtime.errors import RequestError
from runtime.lm_service.engine import Engine, EngineStats
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import RequestOutput


class EngineDeadError(RuntimeError):
    """The step loop failed (for example an expert-parallel rank died); the engine takes no more work."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs joined, the rest from
    the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    return msgspec.structs.replace(
        last,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        logprobs=logprobs if any(o.logprobs is not None for o in outputs) else None,
    )


class AsyncEngine:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05, stats_period_s: float = 0.1):
        self.engine = engine
        self.idle_wait_s, self.stats_period_s = idle_wait_s, stats_period_s
        self.error: BaseException | None = None
        self._lock = threading.Lock()  # held by the loop while it steps; commands never wait for it
        self._commands: deque[Callable[[], object]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._closed = False
        self._stats, self._stats_at = engine.stats(), time.monotonic()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def add_request(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]] = (),
                    stream_interval_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """Queue the request (RequestError now if it can never run, EngineDeadError if the loop
        died) and return its output stream. Must be called on the asyncio loop that will read the
        stream.

        With stream_interval_s > 0 (default: the engine config's), outputs after the first are
        merged over that interval: fewer, larger messages for a reader across a process boundary
        (each costs an RPC), at the price of burstier inter-token gaps. The first token is never
        held back."""
        self._check_alive()
        self.engine.check(request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request.request_id] = stream
        self._command(lambda: self._admit(request, embeddings))
        interval = self.engine.config.stream_interval_s if stream_interval_s is None else stream_interval_s
        return self._read(request.request_id, stream, interval)

    def _admit(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]]) -> None:
        try:
            self.engine.add_request(request)
        except RequestError as e:  # passed check() but not add (an id already live)
            self._deliver([RequestOutput(request.request_id, [], "", True, "error", str(e),
                                         error_type="invalid_request")])
            return
        for index, tensor in embeddings:
            self.engine.add_embeddings(request.request_id, index, tensor)

    async def _read(self, request_id: str, stream: _Stream, interval_s: float) -> AsyncIterator[RequestOutput]:
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
                self.abort(request_id)

    async def generate(self, request: EngineRequest,
                       embeddings: Sequence[tuple[int, torch.Tensor]] = ()) -> AsyncIterator[RequestOutput]:
        """Queue the request and yield its outputs until the finished one."""
        async for out in self.add_request(request, embeddings):
            yield out

    def add_embeddings(self, request_id: str, image_index: int, tensor: torch.Tensor) -> None:
        self._command(lambda: self.engine.add_embeddings(request_id, image_index, tensor))

    def fail(self, request_id: str, message: str, error_type: str = "internal") -> None:
        self._command(lambda: self.engine.fail(request_id, message, error_type))

    def when_missing(self, request_id: str, indexes: list[int], reply: Callable[[list[int]], None]) -> None:
        """Call reply (on the step thread) with those of `indexes` whose embeddings the request still
        lacks, once every command queued before this one is applied ([] if the request ended)."""
        self._command(lambda: reply(sorted(set(indexes) & set(self.engine.missing_embeddings(request_id)))))

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._command(lambda: self.engine.abort(request_id))

    def stats(self) -> EngineStats:
        """As of the last step (refreshed every stats_period_s while the loop runs)."""
        return self._stats

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        with self._lock:
            self._apply_commands()
            self.engine.close()

    def _command(self, command: Callable[[], object]) -> None:
        self._commands.append(command)  # deque.append is atomic: no lock
        self._wake.set()

    def _check_alive(self) -> None:
        if self.error is not None or self._closed:
            raise EngineDeadError(f"the engine stopped: {self.error or 'closed'}")

    def _apply_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                steps_before = self.engine.steps_run
                try:
                    self._apply_commands()
                    outputs = self.engine.step()
                except Exception as e:  # the group or the model is broken: fail everything, stop
                    self.error = e
                    outputs = self.engine.fail_all(f"engine step failed: {e}")
                ran = self.engine.steps_run > steps_before
                self._refresh_stats(force=not ran)
            self._deliver(outputs)
            if self.error is not None:
                return
            if not ran and not self._commands:  # nothing schedulable (idle, or waiting for embeddings)
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()

    def _refresh_stats(self, force: bool) -> None:
        now = time.monotonic()
        if force or now - self._stats_at >= self.stats_period_s:
            self._stats, self._stats_at = self.engine.stats(), now

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
