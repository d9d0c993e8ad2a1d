"""The LM replica's side of the vision pool: ask for embeddings, and release what was asked for.

Embeddings come back over ZMQ to this replica's inbox, not through the handle; the handle call
returns once every image was pushed (`EncodeAccepted`, naming the vision replica that holds the
request's cache references). Releases go to that replica when the request has ended *and* no encode
for it is still in flight: a release that overtook an encode would leave the encode's references
behind. The engine's hooks call `request_ended` and `encode` from its step thread; everything else
runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runtime.protocol import EncodeError, EncodeRequest, ErrorKind, ImagePayload
from runtime.settings import VisionClientConfig
from runtime.transport import EmbeddingSender

log = logging.getLogger(__name__)

# (request_id, message, error kind) -> the engine fails the request
FailRequest = Callable[[str, str, ErrorKind], None]
# (request_id, image indexes, reply) -> the engine calls reply (on any thread) with those of the
# indexes whose embeddings the request still lacks once everything received so far is applied
MissingEmbeddings = Callable[[str, list[int], Callable[[list[int]], None]], None]

def encode_failure(error: EncodeError) -> tuple[str, ErrorKind]:
    """How an image that failed to encode fails its request: (message, error kind)."""
    return f"image {error.image_index}: {error.message}", ErrorKind(error.error_type).of_request()


@dataclass
class _Request:
    images: list[ImagePayload]
    senders: set[str] = field(default_factory=set)
    in_flight: int = 0
    asks: int = 0  # encode calls started; an arrival check only judges the latest one
    ended: bool = False


@dataclass
class VisionClientStats:
    requests: int  # requests with images not yet fully released
    encodes: int
    encode_failures: int
    arrival_timeouts: int
    releases_sent: int
    releases_dropped: int


class VisionClient:
    def __init__(self, handle: Any, reply_to: str, sender: EmbeddingSender, fail: FailRequest,
                 missing: MissingEmbeddings, config: VisionClientConfig = VisionClientConfig()):
        self.handle, self.reply_to, self.sender = handle, reply_to, sender
        self.fail, self.missing, self.config = fail, missing, config
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counts = {"encodes": 0, "encode_failures": 0, "arrival_timeouts": 0,
                        "releases_sent": 0, "releases_dropped": 0}

    def expect(self, request_id: str, images: list[ImagePayload]) -> None:
        """Before the engine sees the request: so that an ending that comes first is not missed."""
        self._loop = asyncio.get_running_loop()
        with self._lock:
            self._requests[request_id] = _Request(list(images))

    def encode(self, request_id: str, indexes: list[int] | None = None) -> None:
        """Ask the pool for these images' embeddings (all by default). On the event loop."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.ended:
                return
            indexes = list(range(len(req.images))) if indexes is None else indexes
            req.in_flight += 1
            req.asks += 1
            ask = req.asks
            images = [req.images[i] for i in indexes]
        # A context of its own: Serve cancels the child calls made in a request's context when its
        # client leaves, and an encode cancelled after the vision replica took its references but
        # before its answer (which names that replica) came back would leave them held until the
        # lease ran out (seen once in 1,000 requests on a loaded machine). The encode always runs to
        # its answer, so the release reaches the replica that holds the references.
        task = asyncio.get_running_loop().create_task(self._encode(request_id, images, indexes, ask),
                                                      context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def encode_from_thread(self, request_id: str, indexes: list[int]) -> None:
        """The engine's need_embeddings hook (a preempted request dropped embeddings it needs again)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.encode, request_id, indexes)

    async def _encode(self, request_id: str, images: list[ImagePayload], indexes: list[int], ask: int) -> None:
        sender = None
        self._counts["encodes"] += 1
        try:
            call = self.handle.encode.remote(EncodeRequest(request_id, images, self.reply_to, indexes))
            accepted = await asyncio.wait_for(call, self.config.encode_timeout_s)
            sender = accepted.sender
        except TimeoutError:
            self._counts["encode_failures"] += 1
            log.warning("%s: the vision pool did not answer within %s s", request_id, self.config.encode_timeout_s)
            self.fail(request_id, f"the vision pool did not answer within {self.config.encode_timeout_s} s",
                      ErrorKind.TIMEOUT)
        except Exception:  # the vision replica died or refused: this request fails, others go on
            self._counts["encode_failures"] += 1
            log.exception("%s: the encode call to the vision pool failed", request_id)
            self.fail(request_id, "the vision pool failed to encode the request's images; the LM replica's log "
                                  "has the details", ErrorKind.INTERNAL)
        finally:
            self._encode_done(request_id, sender)
        if sender is not None:
            await self._check_arrival(request_id, indexes, ask)

    def _encode_done(self, request_id: str, sender: str | None) -> None:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            req.in_flight -= 1
            if sender is not None:
                req.senders.add(sender)
        self._release_if_done(request_id)

    async def _check_arrival(self, request_id: str, indexes: list[int], ask: int) -> None:
        """Everything was pushed before the call returned; what has not arrived by the deadline was
        lost on the way (or its LM-side handling failed)."""
        await asyncio.sleep(self.config.arrival_timeout_s)
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.ended or req.asks != ask:
                return
        self.missing(request_id, indexes, lambda lost: self._lost(request_id, lost))

    def _lost(self, request_id: str, lost: list[int]) -> None:
        if lost:
            self._counts["arrival_timeouts"] += 1
            log.warning("%s: embeddings of image(s) %s did not arrive within %s s", request_id, lost,
                        self.config.arrival_timeout_s)
            self.fail(request_id, f"embeddings of image(s) {lost} did not arrive within "
                                  f"{self.config.arrival_timeout_s} s of being sent", ErrorKind.TIMEOUT)

    def request_ended(self, request_id: str) -> None:
        """The engine's released hook (any thread)."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None:
                return
            req.ended = True
        self._release_if_done(request_id)

    def _release_if_done(self, request_id: str) -> None:
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or not req.ended or req.in_flight:
                return
            del self._requests[request_id]
        for address in req.senders:
            sent = self.sender.send_release(address, request_id)
            self._counts["releases_sent" if sent else "releases_dropped"] += 1

    def forget(self, request_id: str) -> None:
        """The engine refused the request: nothing was asked for it."""
        with self._lock:
            self._requests.pop(request_id, None)

    def stats(self) -> VisionClientStats:
        with self._lock:
            live = len(self._requests)
        return VisionClientStats(requests=live, **self._counts)
