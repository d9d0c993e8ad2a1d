"""The LM replica's vision client against a fake vision handle: when releases go out, and how
failures and lost embeddings end a request."""

from __future__ import annotations

import asyncio
import logging

from runtime.lm_service.vision_client import VisionClient
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

    def send_release(self, address: str, request_id: str) -> bool:
        self.released.append((address, request_id))
        return True


def _client(missing=lambda rid, indexes, reply: reply([]), **config):
    failures: list[tuple[str, str, str]] = []
    handle, sender = FakeHandle(), FakeSender()
    client = VisionClient(handle, "tcp://lm:1", sender, lambda *a: failures.append(a), missing,
                          VisionClientConfig(**config))
    return client, handle, sender, failures


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_release_waits_for_the_encode_in_flight() -> None:
    async def main():
        client, handle, sender, failures = _client()
        client.expect("r", IMAGES)
        client.encode("r")
        await _settle()
        client.request_ended("r")  # the client left while the vision pool was still encoding
        assert sender.released == []
        request, future = handle.calls[0]
        assert request.reply_to == "tcp://lm:1" and request.indexes() == [0, 1]
        future.set_result(EncodeAccepted("tcp://vision:7", 2))
        await _settle()
        assert sender.released == [("tcp://vision:7", "r")] and not failures
        assert client.stats().requests == 0

    asyncio.run(main())


def test_reencode_to_another_replica_releases_both() -> None:
    async def main():
        client, handle, sender, _ = _client()
        client.expect("r", IMAGES)
        client.encode("r")
        await _settle()
        handle.calls[0][1].set_result(EncodeAccepted("tcp://v1:1", 2))
        client.encode("r", [1])  # preempted: image 1 was dropped and is needed again
        await _settle()
        again = handle.calls[1][0]
        assert again.indexes() == [1] and again.images == [IMAGES[1]]
        handle.calls[1][1].set_result(EncodeAccepted("tcp://v2:1", 1))
        await _settle()
        client.request_ended("r")
        assert sorted(sender.released) == [("tcp://v1:1", "r"), ("tcp://v2:1", "r")]

    asyncio.run(main())


def test_an_ended_request_is_not_encoded_and_a_refused_one_is_forgotten() -> None:
    async def main():
        client, handle, sender, _ = _client()
        client.expect("gone", IMAGES)
        client.request_ended("gone")
        client.encode("gone")
        client.expect("refused", IMAGES)
        client.forget("refused")
        client.encode("refused")
        await _settle()
        assert handle.calls == [] and sender.released == [] and client.stats().requests == 0

    asyncio.run(main())


def test_a_failed_or_slow_vision_pool_fails_the_request() -> None:
    async def main():
        client, handle, sender, failures = _client(encode_timeout_s=0.05)
        client.expect("dead", IMAGES)
        client.encode("dead")
        client.expect("slow", IMAGES)
        client.encode("slow")
        await _settle()
        handle.calls[0][1].set_exception(RuntimeError("replica died"))
        await asyncio.sleep(0.1)
        kinds = {rid: kind for rid, _, kind in failures}
        assert kinds == {"dead": "internal", "slow": "timeout"}
        assert client.stats().encode_failures == 2
        client.request_ended("dead")
        client.request_ended("slow")
        assert sender.released == [] and client.stats().requests == 0  # no replica was told it holds anything

    asyncio.run(main())


def test_a_crashed_encode_call_is_logged_with_its_traceback_and_not_shown_to_the_client(caplog) -> None:
    async def main():
        client, handle, _, failures = _client()
        client.expect("crash", IMAGES)
        client.encode("crash")
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
        client, handle, _, failures = _client(
            missing=lambda rid, indexes, reply: reply(sorted(set(indexes) & set(waiting[rid]))), arrival_timeout_s=0.05)
        for rid in waiting:
            client.expect(rid, IMAGES)
            client.encode(rid)
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
        client, _, sender, _ = _client()
        client.handle = ScopeSeeingHandle()
        REQUEST_SCOPE.set("the HTTP request's context")
        client.expect("r", IMAGES)
        client.encode("r")
        await _settle()
        assert seen == [None]
        client.request_ended("r")
        client.handle.calls[0][1].set_result(EncodeAccepted("tcp://vision:7", 2))
        await _settle()
        assert sender.released == [("tcp://vision:7", "r")]

    asyncio.run(main())
