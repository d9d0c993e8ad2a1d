"""The images of every request an LM replica serves, from expectation to release, in one object."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from runtime.lm_service.engine import EngineHooks
from runtime.protocol import EncodeRequest, ErrorKind, ImagePayload
from runtime.settings import VisionClientConfig

log = logging.getLogger(__name__)


# --- what other threads tell the feed (through `post`, its one thread-safe entry point) -----------

@dataclass(frozen=True)
class Ended:
    """The engine let go of the request (finished, aborted, failed, refused, or its engine died)."""

    request_id: str


@dataclass(frozen=True)
class NeededAgain:
    """Preemption dropped embeddings the request still needs: ask the pool again."""

    request_id: str
    image_indexes: tuple[int, ...]


@dataclass(frozen=True)
class StillMissing:
    """The engine's answer to an arrival check: which of the asked images never arrived."""

    request_id: str
    ask: int  # the encode call the check was made for
    image_indexes: tuple[int, ...]


FeedEvent = Ended | NeededAgain | StillMissing


class EngineFace(Protocol):
    """What the feed asks of the engine (AsyncEngine or EngineClient): commands its step loop applies."""

    def fail(self, request_id: str, message: str, error_type: ErrorKind = ...) -> None: ...

    def when_missing(self, request_id: str, indexes: list[int], reply: Callable[[list[int]], None]) -> None: ...


class Releases(Protocol):
    """Where release messages go (runtime.transport.EmbeddingSender)."""

    def send_release(self, address: str, request_id: str) -> bool: ...


@dataclass
class _Request:
    images: list[ImagePayload]  # kept for a re-ask after preemption
    senders: set[str] = field(default_factory=set)  # vision replicas that took references for it
    in_flight: int = 0  # encode calls not yet answered
    asks: int = 0  # encode calls started; an arrival check only judges the latest one
    ended: bool = False


@dataclass
class ImageFeedStats:
    requests: int  # requests with images not yet fully released
    encodes: int
    encode_failures: int
    arrival_timeouts: int
    releases_sent: int
    releases_dropped: int


class ImageFeed:
    """Owns each request's images in an LM replica: expect -> encode -> (arrival) -> fail -> release.

    Who holds a reference to an image's embeddings, and when it is dropped:
    - The vision replica's cache entry holds one reference per request for every encode call that
      replica accepted (`EncodeAccepted.sender`, kept in `senders`; a re-ask after preemption may
      land on another replica). The feed drops them all with one release per replica, sent once the
      request has ended *and* no encode call for it is still unanswered; a lost release is
      reclaimed by the pool's lease.
    - The engine's per-request dict (`Engine.embeddings`) holds the tensor from its arrival (the
      engine's inbox hands it straight to the step loop's command queue: tensors never pass through
      here; an engine-core process holds one that overtook its request's add until the add comes,
      runtime.lm_service.engine_core._EarlyArrivals) until the prefill has passed the image, and
      always drops the whole dict when the request ends (finished, aborted because the client left,
      failed, engine death). Preemption may drop embeddings the request needs again: the engine
      reports `NeededAgain` and the feed re-asks.
    - The feed holds the image bytes (for a re-ask) and the `senders`, from `expect` until the release.

    What must never happen:
    - A release before the last use: the engine reports `Ended` only after it dropped the
      request's embeddings, and the release waits for it.
    - A release that overtakes an encode in flight (the encode's references would outlive it):
      the release waits until every encode call for the request was answered.
    - A leaked reference after a request ends: every admitted request ends in the engine exactly
      once (a dead engine-core process ends all of its requests), and a request the engine refused
      before admission is forgotten, having asked for nothing.

    Threads: `expect`, `forget`, `encode` and every handler run on the replica's event loop, so the
    feed's state needs no lock. The engine's step thread, the engine client's reader thread and
    arrival-check replies reach it only through `post` (the engine's hooks are `feed_hooks(post)`),
    which queues the event onto that loop: `expect` comes before the request reaches the engine, so
    no report about it can come first. Toward the engine the feed only queues commands: `fail`, and
    `when_missing` whose answer comes back through `post`.
    """

    def __init__(self, pool: Any, engine: EngineFace, reply_to: str, releases: Releases,
                 config: VisionClientConfig = VisionClientConfig()):
        self.pool, self.engine, self.reply_to, self.releases, self.config = pool, engine, reply_to, releases, config
        self._requests: dict[str, _Request] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counts = {"encodes": 0, "encode_failures": 0, "arrival_timeouts": 0,
                        "releases_sent": 0, "releases_dropped": 0}
        self._handlers: dict[type, Callable[[Any], None]] = {
            Ended: self._ended, NeededAgain: self._needed_again, StillMissing: self._still_missing}

    # --- any thread ------------------------------------------------------------------------------

    def post(self, event: FeedEvent) -> None:
        """Queue an event onto the feed's event loop. Before the first request with images there is
        nothing the event could be about."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._handle, event)
        except RuntimeError:  # the loop closed: the replica is going away; the pool's lease reclaims
            log.debug("dropped %s: the event loop is closed", event)

    # --- the replica's event loop ----------------------------------------------------------------

    def expect(self, request_id: str, images: list[ImagePayload]) -> None:
        """Before the engine sees the request: so that an ending that comes first is not missed."""
        self._loop = asyncio.get_running_loop()
        if images:
            self._requests[request_id] = _Request(list(images))

    def forget(self, request_id: str) -> None:
        """The engine refused the request before admitting it: nothing was asked for it."""
        self._requests.pop(request_id, None)

    def encode(self, request_id: str, indexes: list[int] | None = None) -> None:
        """Ask the pool for these images' embeddings (all by default)."""
        req = self._requests.get(request_id)
        if req is None or req.ended:
            return
        indexes = list(range(len(req.images))) if indexes is None else indexes
        req.in_flight += 1
        req.asks += 1
        images = [req.images[i] for i in indexes]
        # A context of its own: Serve cancels the child calls made in a request's context when its
        # client leaves, and an encode cancelled after the vision replica took its references but
        # before its answer (which names that replica) came back would leave them held until the
        # lease ran out (seen once in 1,000 requests on a loaded machine). The encode always runs to
        # its answer, so the release reaches the replica that holds the references.
        task = asyncio.get_running_loop().create_task(self._encode(request_id, images, indexes, req.asks),
                                                      context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> ImageFeedStats:
        return ImageFeedStats(requests=len(self._requests), **self._counts)

    def _handle(self, event: FeedEvent) -> None:
        self._handlers[type(event)](event)

    def _ended(self, event: Ended) -> None:
        req = self._requests.get(event.request_id)
        if req is not None:
            req.ended = True
            self._release_if_done(event.request_id)

    def _needed_again(self, event: NeededAgain) -> None:
        self.encode(event.request_id, list(event.image_indexes))

    def _still_missing(self, event: StillMissing) -> None:
        req = self._requests.get(event.request_id)
        if not event.image_indexes or req is None or req.ended or req.asks != event.ask:
            return  # all arrived, the request is gone, or a later ask is being judged on its own
        lost = list(event.image_indexes)
        self._counts["arrival_timeouts"] += 1
        log.warning("%s: embeddings of image(s) %s did not arrive within %s s", event.request_id, lost,
                    self.config.arrival_timeout_s)
        self.engine.fail(event.request_id, f"embeddings of image(s) {lost} did not arrive within "
                                            f"{self.config.arrival_timeout_s} s of being sent", ErrorKind.TIMEOUT)

    async def _encode(self, request_id: str, images: list[ImagePayload], indexes: list[int], ask: int) -> None:
        sender = None
        self._counts["encodes"] += 1
        try:
            call = self.pool.encode.remote(EncodeRequest(request_id, images, self.reply_to, indexes))
            accepted = await asyncio.wait_for(call, self.config.encode_timeout_s)
            sender = accepted.sender
        except TimeoutError:
            self._counts["encode_failures"] += 1
            log.warning("%s: the vision pool did not answer within %s s", request_id, self.config.encode_timeout_s)
            self.engine.fail(request_id, f"the vision pool did not answer within {self.config.encode_timeout_s} s",
                             ErrorKind.TIMEOUT)
        except Exception:  # the vision replica died or refused: this request fails, others go on
            self._counts["encode_failures"] += 1
            log.exception("%s: the encode call to the vision pool failed", request_id)
            self.engine.fail(request_id, "the vision pool failed to encode the request's images; the LM replica's "
                                         "log has the details", ErrorKind.INTERNAL)
        finally:
            self._encode_done(request_id, sender)
        if sender is not None:
            await self._check_arrival(request_id, indexes, ask)

    def _encode_done(self, request_id: str, sender: str | None) -> None:
        req = self._requests.get(request_id)
        if req is None:
            return
        req.in_flight -= 1
        if sender is not None:
            req.senders.add(sender)
        self._release_if_done(request_id)

    async def _check_arrival(self, request_id: str, indexes: list[int], ask: int) -> None:
        """Everything was pushed before the call returned; what has not arrived by the deadline was
        lost on the way (or its LM-side handling failed). The engine answers once everything it
        received so far is applied."""
        await asyncio.sleep(self.config.arrival_timeout_s)
        req = self._requests.get(request_id)
        if req is None or req.ended or req.asks != ask:
            return
        self.engine.when_missing(request_id, indexes,
                                 lambda lost: self.post(StillMissing(request_id, ask, tuple(lost))))

    def _release_if_done(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None or not req.ended or req.in_flight:
            return
        del self._requests[request_id]
        for address in req.senders:
            sent = self.releases.send_release(address, request_id)
            self._counts["releases_sent" if sent else "releases_dropped"] += 1


def feed_hooks(post: Callable[[FeedEvent], None]) -> EngineHooks:
    """The engine's reports (from its step thread, or the engine client's reader thread), as events
    for a feed's `post`."""
    return EngineHooks(need_embeddings=lambda rid, indexes: post(NeededAgain(rid, tuple(indexes))),
                       released=lambda rid: post(Ended(rid)))
