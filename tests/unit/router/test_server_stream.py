"""The router's SSE framing (Router._sse) with a fake LM stream: what a client sees, and when."""

from __future__ import annotations

import asyncio
import functools
import json
from types import SimpleNamespace

from runtime.protocol import GenerateRequest, RequestOutput, SamplingParams
from runtime.requests import ResponseOptions
from runtime.router import server
from runtime.router.metrics import RequestTimer, RouterMetrics


def _router(outputs: list[RequestOutput], first_token: asyncio.Event) -> SimpleNamespace:
    """What Router._sse reads of its replica; its LM stream waits for `first_token` before its outputs."""
    cls = server.Router.func_or_class

    async def merged(plan):
        await first_token.wait()
        for out in outputs:
            yield 0, out

    router = SimpleNamespace(model="m", config=SimpleNamespace(limits=SimpleNamespace(request_timeout_s=5.0)),
                             telemetry=RouterMetrics(), prep=SimpleNamespace(tokenizer=None), _merged=merged)
    router._chunk = functools.partial(cls._chunk, router)
    router._sse = functools.partial(cls._sse, router)
    return router


def _plan(n: int = 1) -> server._Plan:
    gen = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=2))
    return server._Plan("r", [gen] * n, n, ResponseOptions(stream=True), [None] * n)


async def _events(first_token: asyncio.Event, outputs: list[RequestOutput]) -> tuple[list[dict], bool]:
    router = _router(outputs, first_token)
    stream = router._sse(_plan(), True, RequestTimer(router.telemetry))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    early = first.done()  # anything sent while the engine had produced nothing yet
    first_token.set()
    chunks = [await first] + [chunk async for chunk in stream]
    events = [json.loads(c.decode()[len("data: "):]) for c in chunks if not c.startswith(b"data: [DONE]")]
    return events, early


def test_the_role_chunk_waits_for_the_first_token():
    """vLLM's bench and OpenAI clients time TTFT at the first chunk: a role chunk sent before the
    prefill would report admission as the first token, and put the prefill into the first gap."""
    outputs = [RequestOutput("r", [5], "a"), RequestOutput("r", [6], "b", True, "length")]
    events, early = asyncio.run(_events(asyncio.Event(), outputs))
    assert not early
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("content") for d in deltas[1:]] == ["a", "b"]
