"""The LM replica's side of its engine-core process (runtime.lm_service.engine_core).

Same face as AsyncEngine (add_request -> output stream, abort, fail, when_missing, stats, error,
close), so the deployment does not care where the engine steps. The replica binds two local ZMQ
sockets (commands out, events in) and spawns the core, which connects to both. A reader thread
turns events into stream outputs (one wake-up per step for each event loop), engine hooks (an LM
replica's ImageFeed posts them onto its event loop), missing-embedding replies and stats.

If the core dies (killed, out of memory, a step failed), every live stream ends with an error,
the vision references of every live request are released through the `released` hook, `error` is
set (the replica's health check fails and the request router skips it), and no new request is taken.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence

import msgspec
import torch
import zmq

from runtime import logs
from runtime.lm_service.admin import reply_on
from runtime.lm_service.async_engine import OutputStreams
from runtime.lm_service.engine import EngineHooks, EngineStats
from runtime.lm_service.engine_core import CoreSpec, run_engine_core
from runtime.lm_service.engine_loop import EngineDeadError, error_output
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import (
    AdminOp,
    AdminResult,
    CoreAbort,
    CoreAdd,
    CoreAdmin,
    CoreAdminDone,
    CoreCommand,
    CoreDead,
    CoreEvent,
    CoreFail,
    CoreMissing,
    CoreNeedEmbeddings,
    CoreOutputs,
    CoreReady,
    CoreReleased,
    CoreShutdown,
    CoreStats,
    CoreWhenMissing,
    ErrorKind,
    RequestOutput,
)
from runtime.settings import EngineConfig

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(CoreEvent)


class EngineClient:
    def __init__(self, model_dir: str, config: EngineConfig, hooks: EngineHooks, inbox_host: str,
                 start_timeout_s: float = 600.0, liveness_period_s: float = 0.5,
                 weights: tuple[str, int] | None = None):
        """weights: (checkpoint, version) to serve instead of model_dir's own (after a weight update)."""
        if config.ep_size > 1:  # EP ranks are Ray actors the replica places; the core is no Ray process
            raise ValueError(f"an engine-core process runs ep_size 1, not {config.ep_size}")
        self.config, self.hooks = config, hooks
        self.liveness_period_s = liveness_period_s
        self.error: BaseException | None = None
        self.malformed_messages = 0
        self.streams = OutputStreams(self.abort)
        self._live: set[str] = set()  # admitted and not yet released
        self._missing_replies: dict[int, Callable[[list[int]], None]] = {}
        self._admin_replies: dict[int, Callable[[AdminResult], None]] = {}
        self._tokens = itertools.count()
        self._send_lock = threading.Lock()
        self._closed = False
        self._context = zmq.Context()
        self._commands = self._bind(zmq.PUSH)
        self._events = self._bind(zmq.PULL)
        spec = CoreSpec(model_dir, config, _address(self._commands), _address(self._events), inbox_host, weights,
                        logs.level())
        self.process = mp.get_context("spawn").Process(target=run_engine_core, args=(spec,), daemon=True,
                                                       name="engine-core")
        self.process.start()
        ready = self._wait_ready(start_timeout_s)
        self.inbox_address, self.pid = ready.inbox, ready.pid
        self._stats: EngineStats | None = None
        self._reader = threading.Thread(target=self._read_events, daemon=True, name="core-events")
        self._reader.start()

    def _bind(self, kind: int) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind("tcp://127.0.0.1:*")
        return socket

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._events.poll(200):
                event = _event_decoder.decode(self._events.recv())
                if isinstance(event, CoreReady):
                    return event
                if isinstance(event, CoreDead):
                    self._stop_process()
                    raise RuntimeError(event.message)
            elif not self.process.is_alive():
                raise RuntimeError(f"the engine-core process exited with code {self.process.exitcode} while loading")
        self._stop_process()
        raise TimeoutError(f"the engine-core process was not ready after {timeout_s} s")

    # --- the engine's face (the replica's event loop) ------------------------------------------

    def add_request(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]] = (),
                    stream_interval_s: float | None = None,
                    reply_to: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue the request and return its output stream; a request that can never run gets an
        error as its only output. Embeddings come from the vision pool straight into the core.
        With reply_to (a router's token inbox) the core sends the outputs there, and this stream
        gets only the `relayed` copy of the last one, or an error made here (the core died)."""
        if embeddings:
            raise ValueError("embeddings for an engine-core process go to its inbox, not through the replica")
        self.check_alive()
        interval = self.config.stream_interval_s if stream_interval_s is None else stream_interval_s
        stream = self.streams.open(request.request_id, interval)
        self._live.add(request.request_id)
        self._send(CoreAdd(request.request_id, request.prompt_ids, request.params, list(request.image_hashes),
                           reply_to))
        return stream

    def abort(self, request_id: str) -> None:
        self.streams.close(request_id)
        if request_id in self._live:
            self._send(CoreAbort(request_id))

    def fail(self, request_id: str, message: str, error_type: ErrorKind = ErrorKind.INTERNAL) -> None:
        self._send(CoreFail(request_id, message, error_type))

    def when_missing(self, request_id: str, indexes: list[int], reply: Callable[[list[int]], None]) -> None:
        token = next(self._tokens)
        self._missing_replies[token] = reply
        self._send(CoreWhenMissing(request_id, list(indexes), token))

    async def admin(self, op: AdminOp) -> AdminResult:
        """Run an admin operation in the core (runtime.lm_service.admin); its result when it ended."""
        self.check_alive()
        future, reply = reply_on(asyncio.get_running_loop())
        token = next(self._tokens)
        self._admin_replies[token] = reply
        self._send(CoreAdmin(token, op))
        return await future

    def stats(self) -> EngineStats:
        if self._stats is None:  # before the first snapshot arrived
            return EngineStats(0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0, 0, 0, self.config.ep_size)
        return self._stats

    def check_alive(self) -> None:
        if self.error is not None or self._closed:
            raise EngineDeadError(f"the engine stopped: {self.error or 'closed'}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.process.is_alive():
            self._send(CoreShutdown())
        self._stop_process()
        self._reader.join(timeout=5)
        self._context.destroy(linger=0)

    def _send(self, command: CoreCommand) -> None:
        data = _encoder.encode(command)
        with self._send_lock:  # the event loop, the reader thread (missing replies) and the vision client
            self._commands.send(data)

    def _stop_process(self, timeout_s: float = 10.0) -> None:
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    # --- events from the core (the reader thread) -----------------------------------------------

    def _read_events(self) -> None:
        while not self._closed:
            if self._events.poll(int(self.liveness_period_s * 1000)):
                self._handle(_event_decoder.decode(self._events.recv()))
            elif not self.process.is_alive():
                self._died(f"the engine-core process exited with code {self.process.exitcode}")
                return
            if self.error is not None:
                return

    def _handle(self, event: CoreEvent) -> None:
        if isinstance(event, CoreOutputs):
            self.streams.deliver(event.outputs)
        elif isinstance(event, CoreReleased):
            self._live.discard(event.request_id)
            self.hooks.released(event.request_id)
        elif isinstance(event, CoreNeedEmbeddings):
            self.hooks.need_embeddings(event.request_id, event.image_indexes)
        elif isinstance(event, CoreMissing):
            reply = self._missing_replies.pop(event.token, None)
            if reply is not None:
                reply(event.image_indexes)
        elif isinstance(event, CoreAdminDone):
            admin_reply = self._admin_replies.pop(event.token, None)
            if admin_reply is not None:
                admin_reply(event.result)
        elif isinstance(event, CoreStats):
            self._stats = EngineStats(**event.engine)  # type: ignore[arg-type]
            self.malformed_messages = event.malformed_messages
        elif isinstance(event, CoreDead):
            self._died(event.message)

    def _died(self, message: str) -> None:
        """Fail every live stream, release what every live request held, take no more work."""
        if self.error is None:
            log.error("engine core %s: %s", self.pid, message)
            self.error = EngineDeadError(message)
        live = set(self._live) | set(self.streams.live())
        self.streams.deliver([error_output(rid, f"the engine stopped: {message}") for rid in live])
        for rid in live:
            self._live.discard(rid)
            self.hooks.released(rid)


def _address(socket: zmq.Socket) -> str:
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)

