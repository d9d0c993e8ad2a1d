"""The LM replica's image feed against a fake vision handle and a fake engine: when releases go out,
how failures and lost embeddings end a request, and that other threads reach it only through its
event loop."""

from __future__ import annotations

import asyncio
import logging
import threading

from runtime.lm_service.image_feed import Ended, ImageFeed, StillMissing, feed_hooks
from runtime.protocol import EncodeAccepted, ImagePayload
from runtime.settings import VisionClientConfig

IMAGES = [ImagePayload(b"a", 4, "key-a"), ImagePayload(b"b", 4, "key-b")]


class FakeHandle:
    """`handle.encode.remote(request)` returns a future the test resolves."""

    def __init__(self):
        self.calls: list = []
        self.encode = self

    def remote(self, request):
        future = asyncio.get_running_loop().create_future()
        self.calls.append((request, future))
        return future


class FakeSender:
    def __init__(self):
        self.released: list[tuple[str, str]] = []
        self.threads: set[str] = set()

    def send_release(self, address: str, request_id: str) -> bool:
        self.released.append((address, request_id))
        self.threads.add(threading.current_thread().name)
        return True


class FakeEngine:
    """Records failures; answers an arrival check with `missing` from a thread of its own, as the
    engine's step loop (or the engine client's reader) does."""

    def __init__(self, missing):
        self.missing = missing
        self.failures: list[tuple[str, str, str]] = []

    def fail(self, request_id: str, message: str, error_type="internal") -> None:
        self.failures.append((request_id, message, error_type))

    def when_missing(self, request_id, indexes, reply) -> None:
        threading.Thread(target=lambda: reply(self.missing(request_id, indexes)), name="step-loop").start()


def _feed(missing=lambda rid, indexes: [], **config):
    handle, sender, engine = FakeHandle(), FakeSender(), FakeEngine(missing)
    feed = ImageFeed(handle, engine, "tcp://lm:1", sender, VisionClientConfig(**config))
    return feed, handle, sender, engine.failures


def _ended(feed: ImageFeed, request_id: str) -> None:
    """As the engine reports an ending: through the hooks, which post onto the feed's loop."""
    feed_hooks(feed.post).released(request_id)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_release_waits_for_the_encode_in_flight() -> None:
    async def main():
        feed, handle, sender, failures = _feed()
        feed.expect("r", IMAGES)
        feed.encode("r")
        await _settle()
        _ended(feed, "r")  # the client left while the vision pool was still encoding
        await _settle()
        assert sender.released == []
        request, future = handle.calls[0]
        assert request.reply_to == "tcp://lm:1" and request.indexes() == [0, 1]
        future.set_result(EncodeAccepted("tcp://vision:7", 2))
        await _settle()
        assert sender.released == [("tcp://vision:7", "r")] and not failures
        assert feed.stats().requests == 0

    asyncio.run(main())


def test_reencode_to_another_replica_releases_both() -> None:
    async def main():
        feed, handle, sender, _ = _feed()
        feed.expect("r", IMAGES)
        feed.encode("r")
        await _settle()
        handle.calls[0][1].set_result(EncodeAccepted("tcp://v1:1", 2))
        feed_hooks(feed.post).need_embeddings("r", [1])  # preempted: image 1 was dropped and is needed again
        await _settle()
        again = handle.calls[1][0]
        assert again.indexes() == [1] and again.images == [IMAGES[1]]
        handle.calls[1][1].set_result(EncodeAccepted("tcp://v2:1", 1))
        await _settle()
        _ended(feed, "r")
        await _settle()
        assert sorted(sender.released) == [("tcp://v1:1", "r"), ("tcp://v2:1", "r")]

    asyncio.run(main())


def test_an_ended_request_is_not_encoded_and_a_refused_one_is_forgotten() -> None:
    async def main():
        feed, handle, sender, _ = _feed()
        feed.expect("gone", IMAGES)
        _ended(feed, "gone")
        await _settle()
        feed.encode("gone")
        feed.expect("refused", IMAGES)
        feed.forget("refused")
        feed.encode("refused")
        await _settle()
        assert handle.calls == [] and sender.released == [] and feed.stats().requests == 0

    asyncio.run(main())


def test_a_failed_or_slow_vision_pool_fails_the_request() -> None:
    async def main():
        feed, handle, sender, failures = _feed(encode_timeout_s=0.05)
        feed.expect("dead", IMAGES)
        feed.encode("dead")
        feed.expect("slow", IMAGES)
        feed.encode("slow")
        await _settle()
        handle.calls[0][1].set_exception(RuntimeError("replica died"))
        await asyncio.sleep(0.1)
        kinds = {rid: kind for rid, _, kind in failures}
        assert kinds == {"dead": "internal", "slow": "timeout"}
        assert feed.stats().encode_failures == 2
        _ended(feed, "dead")
        _ended(feed, "slow")
        await _settle()
        assert sender.released == [] and feed.stats().requests == 0  # no replica was told it holds anything

    asyncio.run(main())


def test_a_crashed_encode_call_is_logged_with_its_traceback_and_not_shown_to_the_client(caplog) -> None:
    async def main():
        feed, handle, _, failures = _feed()
        feed.expect("crash", IMAGES)
        feed.encode("crash")
        await _settle()
        handle.calls[0][1].set_exception(RuntimeError("secret internal detail"))
        await _settle()
        return failures

    with caplog.at_level(logging.INFO, logger="runtime"):
        (rid, message, kind), = asyncio.run(main())
    assert (rid, kind) == ("crash", "internal") and "vision pool" in message
    assert "secret" not in message and "RuntimeError" not in message
    record, = [r for r in caplog.records if r.exc_info]
    assert record.getMessage().startswith("crash: ") and record.levelno == logging.ERROR
    assert "secret internal detail" in caplog.text  # the traceback, in the replica's log


def test_embeddings_that_never_arrive_fail_the_request() -> None:
    waiting = {"lost": [0, 1], "fine": []}

    async def main():
        feed, handle, _, failures = _feed(
            missing=lambda rid, indexes: sorted(set(indexes) & set(waiting[rid])), arrival_timeout_s=0.05)
        for rid in waiting:
            feed.expect(rid, IMAGES)
            feed.encode(rid)
        await _settle()
        for _, future in handle.calls:
            future.set_result(EncodeAccepted("tcp://v:1", 2))
        await asyncio.sleep(0.15)
        assert [(rid, kind) for rid, _, kind in failures] == [("lost", "timeout")]
        assert "[0, 1]" in failures[0][1]

    asyncio.run(main())


REQUEST_SCOPE = __import__("contextvars").ContextVar("request_scope", default=None)


def test_the_encode_call_is_not_made_in_the_requests_context() -> None:
    """Serve cancels the child calls made in a request's context when its client leaves; the encode
    must run to its answer (which names the replica to release), so it runs in a context of its own."""
    seen: list = []

    class ScopeSeeingHandle(FakeHandle):
        def remote(self, request):
            seen.append(REQUEST_SCOPE.get())
            return super().remote(request)

    async def main():
        feed, _, sender, _ = _feed()
        feed.pool = ScopeSeeingHandle()
        REQUEST_SCOPE.set("the HTTP request's context")
        feed.expect("r", IMAGES)
        feed.encode("r")
        await _settle()
        assert seen == [None]
        _ended(feed, "r")
        feed.pool.calls[0][1].set_result(EncodeAccepted("tcp://vision:7", 2))
        await _settle()
        assert sender.released == [("tcp://vision:7", "r")]

    asyncio.run(main())


def test_reports_from_other_threads_are_applied_on_the_feeds_event_loop() -> None:
    """The engine's step thread only queues its report: the release goes out on the feed's loop."""

    async def main():
        feed, handle, sender, _ = _feed()
        feed.expect("r", IMAGES)
        feed.encode("r")
        await _settle()
        handle.calls[0][1].set_result(EncodeAccepted("tcp://vision:7", 2))
        await _settle()
        step = threading.Thread(target=feed_hooks(feed.post).released, args=("r",), name="engine-step-loop")
        step.start()
        step.join()
        assert sender.released == []  # queued, not applied on the reporting thread
        await _settle()
        assert sender.released == [("tcp://vision:7", "r")]
        assert sender.threads == {threading.current_thread().name}

    asyncio.run(main())


def test_an_arrival_check_only_judges_the_latest_ask() -> None:
    """A preempted request asked again: the answer to the first ask's check must not fail it while
    the second ask's embeddings are on their way."""

    async def main():
        feed, handle, _, failures = _feed()
        feed.expect("r", IMAGES)
        feed.encode("r")
        feed.encode("r", [1])
        await _settle()
        feed.post(StillMissing("r", 1, (1,)))  # the first ask's answer, late
        await _settle()
        assert failures == []
        feed.post(StillMissing("r", 2, (1,)))
        await _settle()
        assert [(rid, kind) for rid, _, kind in failures] == [("r", "timeout")]
        feed.post(Ended("r"))
        for _, future in handle.calls:
            future.set_result(EncodeAccepted("tcp://v:1", 2))
        await _settle()
        assert feed.stats().requests == 0 and feed.stats().arrival_timeouts == 1

    asyncio.run(main())
