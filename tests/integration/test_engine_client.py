"""The engine in its own process (engine_core) behind EngineClient: the same answers as in-process,
embeddings pushed straight into the core's inbox over real ZMQ, a reader that leaves aborts, a bad
request fails alone, and a core that dies ends every live stream and releases what it held."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

from runtime.lm_service.engine import EngineHooks
from runtime.lm_service.engine_client import EngineClient
from runtime.lm_service.offline import OfflineLLM
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import SamplingParams
from runtime.settings import EngineConfig
from runtime.transport import EmbeddingSender
from tests.integration.workload import mixed, pushed_image_request

CONFIG = EngineConfig(kv_cache_mb=8, block_size=4, stream_interval_ms=0)  # each output streamed alone


class Recorder:
    """Engine hooks that remember what they were told (from the client's reader thread)."""

    def __init__(self) -> None:
        self.released: list[str] = []
        self.lock = threading.Lock()

    def hooks(self) -> EngineHooks:
        return EngineHooks(need_embeddings=lambda rid, indexes: None, released=self.on_released)

    def on_released(self, request_id: str) -> None:
        with self.lock:
            self.released.append(request_id)


def test_answers_equal_the_in_process_engine_and_everything_is_released(checkpoints) -> None:
    path = checkpoints("tiny")
    requests = mixed(6, seed=21, max_tokens=(8, 14))
    llm = OfflineLLM(path, CONFIG)
    expected = [llm.generate(r, f"x{i}") for i, r in enumerate(requests)]
    recorder = Recorder()
    client = EngineClient(str(path), CONFIG, recorder.hooks(), "127.0.0.1")
    sender = EmbeddingSender("vision-test")

    async def one(i: int) -> tuple[list[int], str, str | None]:
        r = requests[i]
        embeds, sizes = llm.encode_images(r.images)
        ids = llm.prompts.token_ids(r.messages, sizes)
        stream = client.add_request(EngineRequest(f"r{i}", ids, r.sampling,
                                                  tuple(llm.image_key(b) for b in r.images)))
        for index, tensor in enumerate(embeds):  # as a vision replica pushes them
            sender.send_embeddings(client.inbox_address, f"r{i}", index, llm.image_key(r.images[index]), tensor)
        tokens, text, reason = [], "", None
        async for out in stream:
            tokens, text, reason = tokens + out.token_ids, text + out.text, out.finish_reason
        return tokens, text, reason

    async def main() -> list:
        return await asyncio.gather(*(one(i) for i in range(len(requests))))

    try:
        results = asyncio.run(main())
        assert sorted(recorder.released) == sorted(f"r{i}" for i in range(len(requests)))
    finally:
        sender.close()
        client.close()
    for (tokens, text, reason), want in zip(results, expected, strict=True):
        assert tokens == want.token_ids and text == want.text and reason == "length"
    assert not client.process.is_alive()


def test_a_reader_that_leaves_aborts_and_a_bad_request_fails_alone(checkpoints) -> None:
    path = checkpoints("tiny")
    recorder = Recorder()
    client = EngineClient(str(path), CONFIG, recorder.hooks(), "127.0.0.1")
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main() -> tuple[list, list]:
        long = client.add_request(EngineRequest("long", [5, 6, 7], params))
        got = []
        async for out in long:
            got += out.token_ids
            if len(got) >= 3:
                break  # the client went away
        bad = [o async for o in client.add_request(EngineRequest("bad", [], params))]  # empty prompt
        return got, bad

    try:
        got, bad = asyncio.run(main())
        for _ in range(100):  # the abort and the release travel back from the core
            if "long" in recorder.released:
                break
            time.sleep(0.05)
        stats = client.stats()
    finally:
        client.close()
    assert len(got) >= 3
    assert len(bad) == 1 and bad[0].finish_reason == "error" and bad[0].error_type == "invalid_request"
    assert "empty" in (bad[0].error or "")
    assert sorted(recorder.released) == ["bad", "long"]
    assert stats.running == 0 and stats.waiting == 0


def test_a_dead_core_ends_every_live_stream_and_releases_them(checkpoints) -> None:
    path = checkpoints("tiny")
    recorder = Recorder()
    client = EngineClient(str(path), CONFIG, recorder.hooks(), "127.0.0.1", liveness_period_s=0.1)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)

    async def main() -> list:
        streams = [client.add_request(EngineRequest(f"s{i}", [3 + i, 4, 5], params)) for i in range(3)]

        async def drain(stream) -> list:
            outs = []
            async for out in stream:
                outs.append(out)
                if len(outs) == 2 and out.request_id == "s0":
                    os.kill(client.pid, signal.SIGKILL)
            return outs

        return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 60)

    try:
        results = asyncio.run(main())
    finally:
        client.close()
    for outs in results:
        assert outs[-1].finish_reason == "error" and "engine stopped" in (outs[-1].error or "")
    assert client.error is not None and sorted(recorder.released) == ["s0", "s1", "s2"]


def test_embeddings_that_arrive_before_their_request_are_held_for_it(checkpoints) -> None:
    # The add travels on the command socket, the images on the inbox: nothing orders the two.
    path = checkpoints("tiny")
    llm = OfflineLLM(path, CONFIG)
    request, embeds, ids, keys = pushed_image_request(llm)
    expected = llm.generate(request, "ref")
    client = EngineClient(str(path), CONFIG, Recorder().hooks(), "127.0.0.1")
    sender = EmbeddingSender("vision-test")

    async def main() -> list[int]:
        for index, tensor in enumerate(embeds):
            sender.send_embeddings(client.inbox_address, "early", index, keys[index], tensor)
        await asyncio.sleep(0.5)  # the core has read them, for a request it does not know yet
        stream = client.add_request(EngineRequest("early", ids, request.sampling, keys))
        return [t async for out in stream for t in out.token_ids]

    try:
        tokens = asyncio.run(asyncio.wait_for(main(), 60))
        dropped = client.stats().dropped_embeddings
    finally:
        sender.close()
        client.close()
    assert tokens == expected.token_ids and dropped == 0


def test_outputs_for_a_token_inbox_go_straight_there_and_the_replica_hears_only_each_end(checkpoints) -> None:
    """reply_to: the core pushes a router's outputs to its inbox (the same answers as in-process);
    the replica's stream gets the relayed last output alone; a request without one streams as before;
    and a core that dies ends a relayed request through the replica's stream."""
    from runtime.router.token_inbox import TokenInbox

    path = checkpoints("tiny")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = {"r0": [5, 6, 7], "r1": [9, 3], "own": [4, 4, 8]}  # the replica's streams: as before
    recorder = Recorder()
    client = EngineClient(str(path), CONFIG, recorder.hooks(), "127.0.0.1", liveness_period_s=0.1)

    async def relayed(inbox: TokenInbox, rid: str) -> tuple[list[int], list]:
        with inbox.opened(rid) as queue:
            stream = client.add_request(EngineRequest(rid, prompts[rid], params), reply_to=inbox.address)
            replica_saw = [out async for out in stream]
            tokens: list[int] = []
            while True:
                out = await asyncio.wait_for(queue.get(), 30)
                tokens += out.token_ids
                if out.finished:
                    return tokens, replica_saw

    async def streamed(rid: str) -> list[int]:
        return [t async for out in client.add_request(EngineRequest(rid, prompts[rid], params)) for t in out.token_ids]

    async def main() -> tuple:
        inbox = TokenInbox("127.0.0.1")
        inbox.start()
        try:
            expected = {rid: await streamed(rid) for rid in ("r0", "r1")}  # as test 1: the in-process answers
            both = await asyncio.gather(relayed(inbox, "r0"), relayed(inbox, "r1"))
            own = [out async for out in client.add_request(EngineRequest("own", prompts["own"], params))]
            dying = client.add_request(EngineRequest("dying", [3, 4], SamplingParams(max_tokens=5000, ignore_eos=True)),
                                       reply_to=inbox.address)
            os.kill(client.pid, signal.SIGKILL)
            last = [out async for out in dying]
            return expected, both, own, last
        finally:
            inbox.close()

    try:
        expected, both, own, last = asyncio.run(main())
    finally:
        client.close()
    for rid, (tokens, replica_saw) in zip(["r0", "r1"], both, strict=True):
        assert tokens == expected[rid] and len(tokens) == 12
        (end,) = replica_saw
        assert end.relayed and end.finished and end.finish_reason == "length"
    assert sum(len(out.token_ids) for out in own) == 12 and not any(o.relayed for o in own)
    (dead,) = last
    assert dead.finish_reason == "error" and not dead.relayed and "engine stopped" in (dead.error or "")
