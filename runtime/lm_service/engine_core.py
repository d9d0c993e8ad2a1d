"""The engine-core process: an LM replica's engine, stepped in a process of its own.

Why a process: in the replica's process the step loop shares one GIL with the replica's event loop
and Ray's threads, and at 16 concurrent streams it got about 70% of a core while busy (bench/README.md).
Here it has a core and an interpreter to itself. The replica (runtime.lm_service.engine_client)
talks to it over two ZMQ sockets of msgspec messages (runtime.protocol: CoreCommand in,
CoreEvent out): requests, aborts and failures in; each step's outputs for all requests as one
message, the engine hooks (embeddings needed again, request released) and a stats snapshot out.
Vision replicas push embeddings straight into this process's own inbox (its address is the
`reply_to` the replica gives the vision pool), so image tensors never pass through the replica.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import torch
import zmq

from runtime.lm_service.engine import Engine, EngineConfig, EngineHooks, EngineStats
from runtime.lm_service.engine_loop import EngineLoop
from runtime.lm_service.request_state import EngineRequest
from runtime.lm_service.vision_client import encode_failure
from runtime.protocol import (
    CoreAbort,
    CoreAdd,
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
)
from runtime.transport import EmbeddingInbox

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
    torch.set_num_threads(spec.config.threads_per_rank)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="core-watchdog").start()
    context = zmq.Context()
    events = _Events(context, spec.events)
    try:
        hooks = EngineHooks(
            need_embeddings=lambda rid, indexes: events.send(CoreNeedEmbeddings(rid, list(indexes))),
            released=lambda rid: events.send(CoreReleased(rid)),
        )
        engine = Engine.from_model_dir(spec.model_dir, spec.config, hooks)
    except BaseException as e:
        events.send(CoreDead(f"the engine failed to load: {type(e).__name__}: {e}"))
        raise
    inbox: EmbeddingInbox | None = None

    def stats(snapshot: EngineStats) -> None:
        events.send(CoreStats(asdict(snapshot), inbox.malformed if inbox is not None else 0))

    loop = EngineLoop(engine, lambda outputs: events.send(CoreOutputs(outputs)), stats)
    # Drained by the command reader, not a thread of its own: see _read.
    inbox = EmbeddingInbox(lambda h, t: _on_embeddings(loop, h, t), lambda e: _on_error(loop, e), spec.inbox_host,
                           context, thread_name=None)
    reader = threading.Thread(target=_read, args=(context, spec.commands, inbox, loop, events), daemon=True,
                              name="core-reader")
    reader.start()
    events.send(CoreReady(inbox.address, os.getpid()))
    try:
        loop.run()  # returns when closed, or when a step failed (the engine is then broken)
        if loop.error is not None:
            events.send(CoreDead(f"engine step failed: {loop.error}"))
    finally:
        inbox.close()
        loop.close()
        events.socket.close()


def _exit_with_parent(parent: int, period_s: float = 1.0) -> None:
    """A replica killed outright (SIGKILL, OOM) cannot stop its core: the core notices it was
    orphaned and exits, so a replaced replica leaves no engine behind."""
    while os.getppid() == parent:
        time.sleep(period_s)
    os._exit(1)


def _on_embeddings(loop: EngineLoop, header: EmbeddingHeader, tensor: torch.Tensor) -> None:
    loop.add_embeddings(header.request_id, header.image_index, tensor)


def _on_error(loop: EngineLoop, error: EncodeError) -> None:
    loop.fail(error.request_id, *encode_failure(error))


def _read(context: zmq.Context, address: str, inbox: EmbeddingInbox, loop: EngineLoop, events: _Events) -> None:
    """One thread reads both sockets, commands first. The replica sends a request's CoreAdd before
    it asks the vision pool for its images, so by the time the embeddings reach the inbox the add
    is already waiting on the command socket: draining commands first queues the add before them
    (two threads, one per socket, could queue them the other way round, and the engine would drop
    embeddings of a request it does not know yet)."""
    commands = context.socket(zmq.PULL)
    commands.connect(address)
    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    poller.register(inbox.socket, zmq.POLLIN)
    handlers: dict[type, Any] = {
        CoreAdd: lambda m: loop.admit(EngineRequest(m.request_id, m.prompt_ids, m.sampling, tuple(m.image_hashes))),
        CoreAbort: lambda m: loop.abort(m.request_id),
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
