"""Running a plan against a fake LM pool (runtime.router.lm_streams): retry once, timeout, fan-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from runtime.protocol import GenerateRequest, RequestOutput, SamplingParams
from runtime.requests import ResponseOptions
from runtime.router.lm_streams import LMFailed, LMStreams, Plan, fan_out
from runtime.router.metrics import RequestTimer, RouterMetrics

Script = Callable[[GenerateRequest, int], AsyncIterator[RequestOutput]]


class _Stream:
    """What `handle.options(stream=True).generate.remote(gen)` returns: async-iterable, cancellable."""

    def __init__(self, outputs: AsyncIterator[RequestOutput]):
        self.outputs = outputs
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self.outputs

    def cancel(self) -> None:
        self.cancelled = True


class _FakeLM:
    """An LM handle whose k-th call (from 0) streams `script(gen, k)`; it records every call."""

    def __init__(self, script: Script):
        self.script = script
        self.calls: list[tuple[str, _Stream]] = []
        self.generate = self  # handle.options(...).generate.remote(...)

    def options(self, stream: bool) -> _FakeLM:
        assert stream
        return self

    def remote(self, gen: GenerateRequest) -> _Stream:
        stream = _Stream(self.script(gen, len(self.calls)))
        self.calls.append((gen.request_id, stream))
        return stream


def _gen(rid: str = "r", seed: int | None = None) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2], SamplingParams(max_tokens=2, seed=seed))


def _plan(gens: list[GenerateRequest], n: int) -> Plan:
    return Plan("r", gens, n, ResponseOptions(), [None] * len(gens))


async def _collect(streams: LMStreams, gen: GenerateRequest) -> list[str]:
    return [out.text async for out in streams.outputs(gen)]


def test_a_stream_that_fails_before_answering_is_tried_once_more():
    async def script(gen, call):
        if call == 0:
            raise RuntimeError("replica died")
        yield RequestOutput(gen.request_id, [5], "a", True, "stop")

    lm = _FakeLM(script)
    streams = LMStreams(lm, timeout_s=5.0)
    assert asyncio.run(_collect(streams, _gen())) == ["a"]
    assert len(lm.calls) == 2 and all(stream.cancelled for _, stream in lm.calls)
    assert streams.in_flight == 0


@pytest.mark.parametrize("fails_after_answering", [False, True])
def test_a_stream_is_not_tried_a_third_time_nor_again_once_it_answered(fails_after_answering):
    async def script(gen, call):
        if fails_after_answering:
            yield RequestOutput(gen.request_id, [5], "a")
        raise RuntimeError("replica died")

    lm = _FakeLM(script)
    streams = LMStreams(lm, timeout_s=5.0)
    with pytest.raises(LMFailed) as failed:
        asyncio.run(_collect(streams, _gen()))
    assert failed.value.retryable is not fails_after_answering
    assert len(lm.calls) == (1 if fails_after_answering else 2)
    assert streams.in_flight == 0


def test_a_stream_past_the_request_timeout_is_cancelled():
    async def script(gen, call):
        yield RequestOutput(gen.request_id, [5], "a")
        await asyncio.sleep(10)

    lm = _FakeLM(script)
    streams = LMStreams(lm, timeout_s=0.05)
    with pytest.raises(TimeoutError):
        asyncio.run(_collect(streams, _gen()))
    (_, stream), = lm.calls
    assert stream.cancelled and streams.in_flight == 0


def test_a_prompts_later_choices_start_after_its_first_choice_answered():
    """Every choice of a prompt after the first waits for the first's first output (its prompt is
    then in the prefix cache); another prompt's first choice does not wait."""
    started: list[str] = []

    async def script(gen, call):
        started.append(gen.request_id)
        await asyncio.sleep(0.01)
        yield RequestOutput(gen.request_id, [5], "a")
        await asyncio.sleep(0.01)  # read before the next comes: outputs that piled up are merged
        yield RequestOutput(gen.request_id, [6], "b", True, "stop")

    async def run() -> tuple[list[tuple[int, str]], list[str]]:
        streams = LMStreams(_FakeLM(script), timeout_s=5.0)
        gens = fan_out(_gen("p0"), 2) + fan_out(_gen("p1"), 2)
        plan = _plan(gens, 2)
        seen = [(index, out.request_id + out.text) async for index, out in streams.merged(plan)]
        dones = await streams.gather(plan, RequestTimer(RouterMetrics()))
        return seen, [d.text for d in dones]

    seen, texts = asyncio.run(run())
    assert started[:2] == ["p0-0", "p1-0"] and sorted(started[2:4]) == ["p0-1", "p1-1"]
    assert sorted(seen) == [(0, "p0-0a"), (0, "p0-0b"), (1, "p0-1a"), (1, "p0-1b"),
                            (2, "p1-0a"), (2, "p1-0b"), (3, "p1-1a"), (3, "p1-1b")]
    assert texts == ["ab"] * 4


def test_a_failing_choice_ends_the_fan_in_and_cancels_the_others():
    async def script(gen, call):
        if gen.request_id == "r-1":
            yield RequestOutput(gen.request_id, [5], "a")
            raise RuntimeError("replica died")
        yield RequestOutput(gen.request_id, [5], "a")
        await asyncio.sleep(10)

    async def run() -> _FakeLM:
        lm = _FakeLM(script)
        with pytest.raises(LMFailed):
            await LMStreams(lm, timeout_s=5.0).gather(_plan(fan_out(_gen(), 2), 2), RequestTimer(RouterMetrics()))
        await asyncio.sleep(0)  # the cancelled pumps run their finally blocks
        return lm

    lm = asyncio.run(run())
    assert all(stream.cancelled for _, stream in lm.calls)


def test_fan_out_gives_each_choice_its_own_id_and_seed():
    assert fan_out(_gen(seed=7), 1) == [_gen(seed=7)]
    gens = fan_out(_gen(seed=2**64 - 1), 3)
    assert [g.request_id for g in gens] == ["r-0", "r-1", "r-2"]
    assert [g.sampling.seed for g in gens] == [2**64 - 1, 0, 1]
    assert [g.sampling.seed for g in fan_out(_gen(), 2)] == [None, None]


# --- with a token inbox: outputs arrive over real ZMQ, the handle call carries only the end ------


def _pusher(address: str):
    import msgspec
    import zmq

    from runtime.protocol import TokenBatch

    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(address)
    return socket, lambda *outs: socket.send(msgspec.msgpack.encode(TokenBatch(list(outs))))


def _relayed_script(pushes: Callable[[GenerateRequest], list[list[RequestOutput]]]):
    """An LM replica whose engine core pushes each batch of `pushes(gen)` to gen.reply_to, then ends
    the call (as LMService.generate does once it hears of the relayed last output)."""

    async def script(gen, call):
        socket, push = _pusher(gen.reply_to)
        try:
            for batch in pushes(gen):
                push(*batch)
                await asyncio.sleep(0.01)
        finally:
            socket.close()
        return
        yield  # an async generator that yields nothing

    return script


@pytest.fixture
def with_inbox():
    """LMStreams over a fake LM and a real TokenInbox, closed after the test (a zmq context left to
    the garbage collector can block in its destructor)."""
    from runtime.router.token_inbox import TokenInbox

    inboxes: list[TokenInbox] = []

    def make(script: Script, **kwargs) -> tuple[LMStreams, _FakeLM]:
        inboxes.append(TokenInbox("127.0.0.1"))
        lm = _FakeLM(script)
        return LMStreams(lm, timeout_s=5.0, inbox=inboxes[-1], **kwargs), lm

    yield make
    for inbox in inboxes:
        inbox.close()


def test_outputs_pushed_to_the_inbox_are_the_stream_and_the_calls_end_is_awaited_for_the_last(with_inbox):
    def pushes(gen):
        rid = gen.request_id
        return [[RequestOutput(rid, [5], "a")], [RequestOutput("someone-else", [9], "z")],
                [RequestOutput(rid, [6], "b"), RequestOutput(rid, [7], "c", True, "stop")]]

    streams, lm = with_inbox(_relayed_script(pushes))

    async def run() -> list[str]:
        texts = await _collect(streams, _gen())
        assert streams.inbox is not None and not streams.inbox._queues  # closed with the request
        return texts

    # the second step's two outputs came in one message: merged, as any outputs that piled up
    assert asyncio.run(run()) == ["a", "bc"]
    (rid, stream), = lm.calls
    assert rid == "r" and stream.cancelled and streams.in_flight == 0


def test_a_call_that_ends_without_the_last_output_fails_after_the_wait(with_inbox):
    streams, lm = with_inbox(_relayed_script(lambda gen: [[RequestOutput(gen.request_id, [5], "a")]]),
                              last_output_wait_s=0.2)
    with pytest.raises(LMFailed) as failed:
        asyncio.run(_collect(streams, _gen()))
    assert not failed.value.retryable and len(lm.calls) == 1  # it had answered: not tried again


def test_an_error_the_replica_itself_sends_ends_the_stream(with_inbox):
    async def script(gen, call):
        yield RequestOutput(gen.request_id, [], "", True, "error", error="the engine stopped")

    streams, _ = with_inbox(script)

    async def run() -> list[RequestOutput]:
        return [out async for out in streams.outputs(_gen())]

    (out,) = asyncio.run(run())
    assert out.finish_reason == "error" and out.error == "the engine stopped"
