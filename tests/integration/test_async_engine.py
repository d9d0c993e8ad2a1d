"""The async stream interface: concurrent streams, deltas that add up, a consumer that leaves, and
the engine's own embedding inbox."""

from __future__ import annotations

import asyncio
import dataclasses

import msgspec

from runtime.lm_service.async_engine import AsyncEngine
from runtime.lm_service.offline import OfflineLLM
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import ErrorKind
from runtime.settings import EngineConfig
from runtime.transport import EmbeddingSender
from tests.integration.workload import mixed, pushed_image_request

CONFIG = EngineConfig(kv_cache_mb=8, block_size=4, stream_interval_ms=0)  # each output streamed alone


def test_streams_add_up_and_leaving_aborts(checkpoints) -> None:
    path = checkpoints("tiny")
    requests = mixed(5, seed=11, max_tokens=(12, 16))
    long = msgspec.structs.replace(requests[0].sampling, max_tokens=300)  # r0 is left long before its end
    requests[0] = dataclasses.replace(requests[0], sampling=long)
    expected = [OfflineLLM(path, CONFIG).generate(r) for r in requests]
    llm = OfflineLLM(path, CONFIG)
    engine = AsyncEngine(llm.engine)

    async def consume(i: int) -> tuple[str, list[int], str | None]:
        r = requests[i]
        embeds, sizes = llm.encode_images(r.images)
        ids = llm.prompts.token_ids(r.messages, sizes)
        request = EngineRequest(f"r{i}", ids, r.sampling, tuple(llm.image_key(b) for b in r.images))
        text, tokens, reason = "", [], None
        async for out in engine.generate(request, list(enumerate(embeds))):
            text, tokens, reason = text + out.text, tokens + out.token_ids, out.finish_reason
            if i == 0 and len(tokens) >= 3:
                break  # the client went away: the engine must abort r0
        return text, tokens, reason

    async def main() -> list[tuple[str, list[int], str | None]]:
        return await asyncio.gather(*(consume(i) for i in range(len(requests))))

    try:
        results = asyncio.run(main())
    finally:
        engine.close()  # applies the commands still queued (r0's abort)
    stats = llm.engine.stats()
    left = results[0][1]  # outputs that piled up arrive merged, so at least 3 tokens
    assert len(left) >= 3 and left == expected[0].token_ids[:len(left)] and results[0][2] is None
    assert len(left) < len(expected[0].token_ids)
    for (text, tokens, reason), want in zip(results[1:], expected[1:], strict=True):
        assert tokens == want.token_ids and text == want.text and reason == "length"
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0
    assert not llm.engine.states


def test_stream_interval_merges_outputs_without_changing_them(checkpoints) -> None:
    path = checkpoints("tiny")
    request = mixed(1, seed=12)[0]
    long = dataclasses.replace(request, sampling=msgspec.structs.replace(request.sampling, max_tokens=60))
    expected = OfflineLLM(path, CONFIG).generate(long)
    llm = OfflineLLM(path, CONFIG)
    engine = AsyncEngine(llm.engine)

    async def consume(interval: float) -> list:
        embeds, sizes = llm.encode_images(long.images)
        ids = llm.prompts.token_ids(long.messages, sizes)
        er = EngineRequest(f"r{interval}", ids, long.sampling, tuple(llm.image_key(b) for b in long.images))
        return [out async for out in engine.add_request(er, list(enumerate(embeds)), stream_interval_s=interval)]

    try:
        # Long enough to merge even on a loaded machine (steps of up to ~0.2 s still merge 2 per message).
        merged = asyncio.run(consume(0.5))
    finally:
        engine.close()
    assert [t for o in merged for t in o.token_ids] == expected.token_ids
    assert "".join(o.text for o in merged) == expected.text and merged[-1].finish_reason == "length"
    assert len(merged[0].token_ids) == 1  # the first token is not held back
    assert len(merged) < 30, f"{len(merged)} messages for 60 tokens"


def test_an_inbox_hands_pushed_embeddings_and_encode_errors_to_the_engine(checkpoints) -> None:
    """As in an LM replica that steps its engine on a thread: vision replicas push to the engine's own
    inbox over real ZMQ; a failed image fails its request alone, with the request's error kind."""
    path = checkpoints("tiny")
    llm = OfflineLLM(path, CONFIG)
    request, embeds, ids, keys = pushed_image_request(llm)
    expected = llm.generate(request, "ref")
    engine = AsyncEngine(llm.engine, inbox_host="127.0.0.1")
    sender = EmbeddingSender("vision-test")

    async def run(request_id: str, fail: bool) -> list:
        stream = engine.add_request(EngineRequest(request_id, ids, request.sampling, keys))
        if fail:
            sender.send_error(engine.inbox_address, request_id, 0, "cannot be decoded", ErrorKind.INVALID_IMAGE)
        else:
            for index, tensor in enumerate(embeds):
                sender.send_embeddings(engine.inbox_address, request_id, index, keys[index], tensor)
        return [out async for out in stream]

    async def main() -> tuple[list, list]:
        return await asyncio.wait_for(asyncio.gather(run("good", False), run("bad", True)), 60)

    try:
        good, bad = asyncio.run(main())
    finally:
        sender.close()
        engine.close()
    assert [t for o in good for t in o.token_ids] == expected.token_ids and good[-1].finish_reason == "length"
    assert bad[-1].finish_reason == "error" and bad[-1].error_type == ErrorKind.INVALID_REQUEST
    assert bad[-1].error == "image 0: cannot be decoded" and engine.malformed_messages == 0
    assert not llm.engine.states
