"""The engine-core process: an LM replica's engine, stepped in a process of its own.

Why a process: in the replica's process the step loop shares one GIL with the replica's event loop
and Ray's threads, and at 16 concurrent streams it got about 70% of a core while busy (bench/README.md).
Here it has a core and an interpreter to itself. The replica (runtime.lm_service.engine_client)
talks to it over two ZMQ sockets of msgspec messages (runtime.protocol: CoreCommand in,
CoreEvent out): requests, aborts and failures in; each step's outputs for all requests as one
message, the engine hooks (embeddings needed again, request released) and a stats snapshot out.
Vision replicas push embeddings straight into this process's own inbox (its address is the
`reply_to` the replica gives the vision pool), so image tensors never pass through the replica.
Likewise a request with a `reply_to` (a router's token inbox) has its outputs pushed straight to
that router, one message per step for all of its requests; the replica hears only its end.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import torch
import zmq

from runtime import logs
from runtime.lm_service.admin import EngineAdmin
from runtime.lm_service.engine import EngineHooks, EngineStats
from runtime.lm_service.engine_loop import EngineLoop, encode_failure
from runtime.lm_service.loading import build_engine
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import (
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
    EmbeddingHeader,
    EncodeError,
    RequestOutput,
    TokenBatch,
)
from runtime.settings import EngineConfig
from runtime.transport import EmbeddingInbox

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(CoreCommand)


@dataclass(frozen=True)
class CoreSpec:
    """What the replica gives the process: the model, the engine settings, the replica's two
    sockets (commands to read, events to write) and the host its embedding inbox binds."""

    model_dir: str
    config: EngineConfig
    commands: str
    events: str
    inbox_host: str
    weights: tuple[str, int] | None = None  # (checkpoint, version) replacing model_dir's weights
    log_level: int = logging.INFO  # the replica's (runtime.logs.level)


class _Outputs:
    """Where each step's outputs go: a request with a reply_to, to that router's token inbox (one
    message per router per step), plus a `relayed` copy of its last output to the replica, which
    ends its handle call; every other request's, to the replica. Sent on the loop's thread only."""

    def __init__(self, context: zmq.Context, events: _Events):
        self.context, self.events = context, events
        self._reply_to: dict[str, str] = {}  # set by the reader thread before the loop sees the request
        self._routers: dict[str, zmq.Socket] = {}
        self.dropped = 0

    def admitted(self, request_id: str, reply_to: str | None) -> None:
        if reply_to is not None:
            self._reply_to[request_id] = reply_to

    def forget(self, request_id: str) -> None:
        """An aborted request has no last output: its caller left."""
        self._reply_to.pop(request_id, None)

    def send(self, outputs: list[RequestOutput]) -> None:
        own: list[RequestOutput] = []
        direct: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            address = self._reply_to.pop(out.request_id, None) if out.finished else self._reply_to.get(out.request_id)
            if address is None:
                own.append(out)
                continue
            direct.setdefault(address, []).append(out)
            if out.finished:  # the replica logs how it ended; the payload (routed experts too) went to the router
                own.append(msgspec.structs.replace(out, relayed=True, token_ids=[], text="", logprobs=None,
                                                   prompt_logprobs=None, routed_experts=None))
        for address, batch in direct.items():
            self._push(address, batch)
        if own:
            self.events.send(CoreOutputs(own))

    def _push(self, address: str, batch: list[RequestOutput]) -> None:
        socket = self._routers.get(address)
        if socket is None:
            socket = self._routers[address] = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 100_000)  # a slow router queues; a gone one is aborted by Serve
            socket.connect(address)
        try:
            socket.send(_encoder.encode(TokenBatch(batch)), zmq.NOBLOCK)
        except zmq.Again:  # never block the step loop: that router's streams lose these outputs
            self.dropped += 1
            log.warning("the token inbox %s is not taking outputs; %d dropped", address, len(batch))

    def close(self) -> None:
        for socket in self._routers.values():
            socket.close()


class _Events:
    """The PUSH socket back to the replica. Only the loop's thread sends, except before the loop
    starts and after it ends, so one socket needs no lock."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.connect(address)

    def send(self, event: CoreEvent) -> None:
        self.socket.send(_encoder.encode(event))


def run_engine_core(spec: CoreSpec) -> None:
    """Process entry point: load the engine, announce the inbox, step until told to stop."""
    logs.to_stderr(spec.log_level)
    torch.set_num_threads(spec.config.threads_per_rank)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="core-watchdog").start()
    context = zmq.Context()
    events = _Events(context, spec.events)
    try:
        hooks = EngineHooks(
            need_embeddings=lambda rid, indexes: events.send(CoreNeedEmbeddings(rid, list(indexes))),
            released=lambda rid: events.send(CoreReleased(rid)),
        )
        engine = build_engine(spec.model_dir, spec.config, hooks)
        if spec.weights is not None:
            engine.load_weights(*spec.weights)
    except BaseException as e:  # the replica's constructor raises this message: Serve shows it to the operator
        log.exception("the engine failed to load %s", spec.model_dir)
        events.send(CoreDead(f"the engine failed to load: {type(e).__name__}: {e}"))
        raise
    inbox: EmbeddingInbox | None = None

    early: _EarlyArrivals | None = None

    def stats(snapshot: EngineStats) -> None:  # on the loop's thread, every stats period
        if early is not None:
            early.expire()
        events.send(CoreStats(asdict(snapshot), inbox.malformed if inbox is not None else 0))

    outputs = _Outputs(context, events)
    loop = EngineLoop(engine, outputs.send, stats)
    early = _EarlyArrivals(loop)
    # Drained by the command reader, not a thread of its own: see _read.
    inbox = EmbeddingInbox(early.embeddings, early.error, spec.inbox_host, context, thread_name=None)
    reader = threading.Thread(target=_read, args=(context, spec.commands, inbox, loop, early, events, outputs),
                              daemon=True, name="core-reader")
    reader.start()
    events.send(CoreReady(inbox.address, os.getpid()))
    try:
        loop.run()  # returns when closed, or when a step failed (the engine is then broken)
        if loop.error is not None:  # the loop logged it with its traceback; the replica ends every stream
            events.send(CoreDead("the engine step failed; the engine-core process's log has the details"))
    finally:
        inbox.close()
        loop.close()
        outputs.close()
        events.socket.close()


def _admit(loop: EngineLoop, early: _EarlyArrivals, outputs: _Outputs, add: CoreAdd) -> None:
    outputs.admitted(add.request_id, add.reply_to)
    loop.admit(EngineRequest(add.request_id, add.prompt_ids, add.sampling, tuple(add.image_hashes)))
    early.admitted(add.request_id)


def _abort(loop: EngineLoop, outputs: _Outputs, request_id: str) -> None:
    outputs.forget(request_id)
    loop.abort(request_id)


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """A replica killed outright (SIGKILL, OOM) cannot stop its core: the core notices it was
    orphaned and exits, so a replaced replica leaves no engine behind."""
    while os.getppid() == parent:
        time.sleep(period_s)
    os._exit(1)


class _EarlyArrivals:
    """What the vision pool pushed for a request whose add has not been applied yet.

    The add comes on the command socket and the images on the inbox, and nothing orders two
    sockets: the replica sends the add before it asks for the images, but under load (or from a
    fast sender) the embeddings can still be read first, and an engine that does not know the
    request drops them; the request would then wait for them until the arrival timeout. So
    arrivals for an unknown request are held, applied right after its add, and dropped (counted,
    as the engine counts late embeddings) after `ttl_s` if no add came: those were late, for a
    request that had already ended. Everything here runs on the loop's thread, inside commands."""

    def __init__(self, loop: EngineLoop, ttl_s: float = 30.0):
        self.loop, self.ttl_s = loop, ttl_s
        self._held: dict[str, list[tuple[float, EmbeddingHeader | EncodeError, torch.Tensor | None]]] = {}

    def embeddings(self, header: EmbeddingHeader, tensor: torch.Tensor) -> None:  # the reader's thread
        self.loop.command(lambda: self._arrive(header, tensor))

    def error(self, error: EncodeError) -> None:  # the reader's thread
        self.loop.command(lambda: self._arrive(error, None))

    def admitted(self, request_id: str) -> None:  # the reader's thread, right after queuing the add
        self.loop.command(lambda: self._release(request_id))

    def expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        for request_id in [r for r, held in self._held.items() if held[0][0] < cutoff]:
            for _, message, tensor in self._held.pop(request_id):
                if tensor is not None:  # unknown to the engine: dropped and counted there
                    self.loop.engine.add_embeddings(request_id, message.image_index, tensor)

    def _release(self, request_id: str) -> None:
        for _, message, tensor in self._held.pop(request_id, []):
            self._apply(message, tensor)

    def _arrive(self, message: EmbeddingHeader | EncodeError, tensor: torch.Tensor | None) -> None:
        if message.request_id in self.loop.engine.states:
            self._apply(message, tensor)
        else:
            self._held.setdefault(message.request_id, []).append((time.monotonic(), message, tensor))

    def _apply(self, message: EmbeddingHeader | EncodeError, tensor: torch.Tensor | None) -> None:
        if isinstance(message, EncodeError):
            self.loop.engine.fail(message.request_id, *encode_failure(message))
        elif tensor is not None:
            self.loop.engine.add_embeddings(message.request_id, message.image_index, tensor)


def _read(context: zmq.Context, address: str, inbox: EmbeddingInbox, loop: EngineLoop, early: _EarlyArrivals,
          events: _Events, outputs: _Outputs) -> None:
    """One thread reads both sockets, commands first: the replica sends a request's CoreAdd before
    it asks the vision pool for its images, so the add is usually queued before them; what still
    comes first waits in _EarlyArrivals."""
    commands = context.socket(zmq.PULL)
    commands.connect(address)
    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    poller.register(inbox.socket, zmq.POLLIN)
    admin = EngineAdmin(loop)
    handlers: dict[type, Any] = {
        CoreAdmin: lambda m: admin.run(m.op, lambda result: events.send(CoreAdminDone(m.token, result))),
        CoreAdd: lambda m: _admit(loop, early, outputs, m),
        CoreAbort: lambda m: _abort(loop, outputs, m.request_id),
        CoreFail: lambda m: loop.fail(m.request_id, m.message, m.error_type),
        CoreWhenMissing: lambda m: loop.when_missing(
            m.request_id, m.image_indexes, lambda lost: events.send(CoreMissing(m.token, lost))),
    }
    while True:
        poller.poll()
        while True:
            try:
                message = _command_decoder.decode(commands.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if isinstance(message, CoreShutdown):
                loop.closed = True
                loop.command(lambda: None)  # wake the loop so that it sees `closed`
                commands.close()
                return
            handlers[type(message)](message)
        inbox.drain()
