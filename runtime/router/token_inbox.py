"""A router replica's token inbox: engine cores push its requests' outputs here directly.

Why: relayed through the LM replica, every output of every stream was one more message through
Serve's handle stream (gRPC, pickling, the replica's event loop): at 16 streams the LM replica
spent about a sixth of the server's CPU per token on that relay (bench/README.md). An engine core
instead sends one message per step to each router with that step's outputs of its requests
(runtime.protocol.TokenBatch); the handle call to the LM replica stays open for what only it knows
(admission, a dead engine, the caller leaving) and ends with the request.

The inbox is a ZMQ PULL socket bound on the router's node address, read on the router's event
loop; each request's outputs go to its own queue until the request closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import msgspec
import zmq
import zmq.asyncio

from runtime.protocol import RequestOutput, TokenBatch

log = logging.getLogger(__name__)
_decoder = msgspec.msgpack.Decoder(TokenBatch)


class TokenInbox:
    """Bound when made; read once `start` runs on the event loop that reads the queues."""

    def __init__(self, host: str):
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # a burst waits here rather than in the engine core
        self.address = f"tcp://{host}:{self._socket.bind_to_random_port(f'tcp://{host}')}"
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.malformed = 0

    def start(self) -> None:
        """On the router's event loop, before the first request uses the inbox (idempotent)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="token-inbox")

    @contextlib.contextmanager
    def opened(self, request_id: str) -> Iterator[asyncio.Queue[RequestOutput]]:
        """The request's queue while it is open; what arrives for a closed one is dropped."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            yield queue
        finally:
            self._queues.pop(request_id, None)

    async def _read(self) -> None:
        while True:
            data = await self._socket.recv()
            try:
                batch = _decoder.decode(data)
            except msgspec.DecodeError:
                self.malformed += 1
                log.warning("%s: a malformed message was dropped", self.address)
                continue
            for out in batch.outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def close(self) -> None:
        if self._reader is not None and not self._reader.done():
            with contextlib.suppress(RuntimeError):  # its loop already closed
                self._reader.cancel()
        self._context.destroy(linger=0)
