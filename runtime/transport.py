"""Embeddings from a vision replica straight into the LM replica that asked, over ZMQ.

The LM replica binds one long-lived PULL socket (`EmbeddingInbox`) and passes its address as
`reply_to`. A vision replica keeps one PUSH socket per destination (`EmbeddingSender`). A message
is two frames: a msgspec header (runtime.protocol.EmbeddingHeader or EncodeError) and, for
embeddings, the tensor's raw bytes, sent without a copy and wrapped on arrival without a copy
(`torch.frombuffer` over the received frame).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable

import msgspec
import torch
import zmq

from runtime.models.common import DTYPES
from runtime.protocol import EmbeddingHeader, EncodeError, ErrorKind, ReleaseRequest, VisionMessage

log = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(VisionMessage)
_release_decoder = msgspec.msgpack.Decoder(ReleaseRequest)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class EmbeddingSender:
    """One PUSH socket per destination address, created on first use and kept. With `proxy`
    (host:port of a SOCKS5 proxy) every socket connects through it (libzmq's ZMQ_SOCKS_PROXY)."""

    def __init__(self, sender_id: str, context: zmq.Context | None = None, linger_ms: int = 1000,
                 proxy: str | None = None):
        self.sender_id = sender_id
        self._context = context or zmq.Context.instance()
        self._sockets: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self.linger_ms = linger_ms
        # Zero-copy sends of embeddings still in flight: libzmq reads the tensor's memory from its I/O
        # thread after send returns. close() waits for them, so a process that sends and then exits
        # never frees that memory under a message still being written (the receiver got garbage).
        self._in_flight: deque[zmq.MessageTracker] = deque()
        self.proxy = proxy

    def _socket(self, address: str) -> zmq.Socket:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            if self.proxy:
                sock.setsockopt_string(zmq.SOCKS_PROXY, self.proxy)
            sock.connect(address)
            self._sockets[address] = sock
        return sock

    def send_embeddings(self, address: str, request_id: str, image_index: int, content_hash: str,
                        embeddings: torch.Tensor) -> None:
        tensor = embeddings.detach().contiguous().cpu()
        header = EmbeddingHeader(request_id, image_index, content_hash, dtype_name(tensor.dtype),
                                 tuple(tensor.shape), self.sender_id)
        raw = tensor.view(torch.uint8).numpy().data  # a memoryview of the tensor's own bytes: no copy
        with self._lock:
            tracker = self._socket(address).send_multipart([_encoder.encode(header), raw], copy=False, track=True)
            while self._in_flight and self._in_flight[0].done:
                self._in_flight.popleft()
            if tracker is not None:
                self._in_flight.append(tracker)

    def send_error(self, address: str, request_id: str, image_index: int, message: str,
                   error_type: ErrorKind) -> None:
        error = EncodeError(request_id, image_index, message, error_type, self.sender_id)
        with self._lock:
            self._socket(address).send(_encoder.encode(error))

    def send_release(self, address: str, request_id: str) -> bool:
        """Never blocks: a release for a replica that is gone (its queue full) is dropped, and the
        vision cache's lease reclaims the references. Returns whether it was queued."""
        with self._lock:
            try:
                self._socket(address).send(_encoder.encode(ReleaseRequest(request_id)), zmq.NOBLOCK)
            except zmq.Again:
                return False
        return True

    def close(self) -> None:
        """Wait (up to linger_ms) for zero-copy sends still being written, then close the sockets."""
        with self._lock:
            deadline = time.monotonic() + self.linger_ms / 1e3
            while self._in_flight:
                tracker = self._in_flight.popleft()
                try:
                    tracker.wait(max(0.0, deadline - time.monotonic()))
                except zmq.NotDone:
                    break
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()


def tensor_from_frame(header: EmbeddingHeader, frame: zmq.Frame) -> torch.Tensor:
    """Wrap the received bytes as a tensor without copying them."""
    dtype = DTYPES[header.dtype]
    count = math.prod(header.shape)
    if len(frame.buffer) != count * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"frame of {len(frame.buffer)} bytes does not hold {header.shape} {header.dtype}")
    return torch.frombuffer(frame.buffer, dtype=dtype, count=count).view(header.shape)


class _PullLoop:
    """One PULL socket bound on a random tcp port, drained by its own thread (or, with
    thread_name None, by whoever polls `socket` and calls `drain`). A message that cannot be
    decoded is counted in `malformed`; it must not take the loop down."""

    def __init__(self, host: str, context: zmq.Context | None, thread_name: str | None):
        self.socket = (context or zmq.Context.instance()).socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://{host}:{self.socket.bind_to_random_port(f'tcp://{host}')}"
        self.malformed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if thread_name is not None:
            self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(100):
                self.drain()
        self.socket.close()

    def drain(self) -> None:
        """Handle every message waiting now, without blocking."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(frames)
            except (msgspec.DecodeError, ValueError, KeyError):
                self.malformed += 1
                log.warning("%s: a malformed message was dropped", self.address, exc_info=True)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        else:
            self.socket.close()


class EmbeddingInbox(_PullLoop):
    """The LM replica's PULL socket and the thread that hands each message to the engine."""

    def __init__(self, on_embeddings: Callable[[EmbeddingHeader, torch.Tensor], None],
                 on_error: Callable[[EncodeError], None], host: str = "127.0.0.1",
                 context: zmq.Context | None = None, thread_name: str | None = "embedding-inbox"):
        self.on_embeddings, self.on_error = on_embeddings, on_error
        super().__init__(host, context, thread_name)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        message = _decoder.decode(frames[0].buffer)
        if isinstance(message, EncodeError):
            self.on_error(message)
        elif len(frames) == 2:
            self.on_embeddings(message, tensor_from_frame(message, frames[1]))
        else:
            self.malformed += 1


class ReleaseInbox(_PullLoop):
    """A vision replica's PULL socket for release messages; its address is the replica's identity."""

    def __init__(self, on_release: Callable[[str], None], host: str = "127.0.0.1",
                 context: zmq.Context | None = None):
        self.on_release = on_release
        super().__init__(host, context, "release-inbox")

    def _handle(self, frames: list[zmq.Frame]) -> None:
        self.on_release(_release_decoder.decode(frames[0].buffer).request_id)
