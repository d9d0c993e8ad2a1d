"""Shaping answers (runtime.router.answers) with a fake LM stream: what a client sees, and when, and
what it hears when serving fails on our side."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from runtime.protocol import GenerateRequest, RequestOutput, SamplingParams
from runtime.requests import ResponseOptions
from runtime.router import openai_api as api
from runtime.router.answers import Answers, WeightsSeen, internal_error
from runtime.router.lm_streams import LMFailed, LMStreams, Plan
from runtime.router.metrics import RequestTimer, RouterMetrics


def _streams(merged) -> LMStreams:
    """LMStreams whose fan-in is `merged(plan)` (no LM pool behind it)."""
    streams = LMStreams(None, timeout_s=5.0)
    streams.merged = merged  # type: ignore[method-assign]
    return streams


def _answers(outputs: list[RequestOutput], first_token: asyncio.Event) -> Answers:
    """Answers over a fake LM stream that waits for `first_token` before its outputs."""

    async def merged(plan):
        await first_token.wait()
        for out in outputs:
            yield 0, out

    return Answers(_streams(merged), "m", None, RouterMetrics(), WeightsSeen())


def _plan(n: int = 1) -> Plan:
    gen = GenerateRequest("r", [1, 2], SamplingParams(max_tokens=2))
    return Plan("r", [gen] * n, n, ResponseOptions(stream=True), [None] * n)


async def _events(first_token: asyncio.Event, outputs: list[RequestOutput]) -> tuple[list[dict], bool]:
    answers = _answers(outputs, first_token)
    stream = answers.sse(_plan(), True, RequestTimer(answers.telemetry))
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


# --- failures ------------------------------------------------------------------------------------


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as e:
        return e


@pytest.mark.parametrize("error,what", [
    (RuntimeError("secret internal detail"), "the router failed"),
    (LMFailed(retryable=False), "the LM replica serving it failed"),
])
def test_an_internal_failure_names_what_failed_and_the_request_but_not_the_exception(caplog, error, what) -> None:
    if isinstance(error, LMFailed):
        error.__cause__ = RuntimeError("secret internal detail")
    with caplog.at_level(logging.ERROR, logger="runtime"):
        api_error = internal_error("chatcmpl-42", _raised(error))
    assert (api_error.status, api_error.type) == (500, "server_error")
    assert api_error.message == f"request chatcmpl-42 failed: {what}; the server's log has the details"
    record, = caplog.records
    assert record.getMessage() == "chatcmpl-42: failed" and record.exc_info is not None
    assert "secret internal detail" in caplog.text


# --- the weights version -------------------------------------------------------------------------


def _done(version: int) -> api.Completion:
    done = api.Completion()
    done.add(RequestOutput("r", [5], "a", True, "length", weights_version=version))
    return done


def test_the_version_header_names_the_version_that_answered_and_remembers_the_newest():
    weights = WeightsSeen()
    assert weights.header() == {"x-weights-version": "0"}
    assert weights.header([_done(3), _done(2)]) == {"x-weights-version": "3"}
    assert weights.header([_done(1)]) == {"x-weights-version": "1"}  # an older replica answered this one
    assert weights.header() == {"x-weights-version": "3"}  # a stream's header: the newest seen
    assert weights.saw([2]) == 3 and weights.saw([5]) == 5


def _failing(error: Exception) -> Answers:
    async def merged(plan):
        yield 0, RequestOutput("r", [5], "a")
        raise error

    return Answers(_streams(merged), "m", None, RouterMetrics(), WeightsSeen())


@pytest.mark.parametrize("error,status", [(TimeoutError(), 504), (LMFailed(retryable=False), 500)])
def test_a_stream_that_ends_early_ends_with_its_error_event_then_done(error, status):
    async def run() -> list[bytes]:
        answers = _failing(error)
        return [c async for c in answers.sse(_plan(), True, RequestTimer(answers.telemetry))]

    *_, last_event, done = asyncio.run(run())
    assert json.loads(last_event.decode()[len("data: "):])["error"]["code"] == status
    assert done == b"data: [DONE]\n\n"


@pytest.mark.parametrize("error,status", [(TimeoutError(), 504), (LMFailed(retryable=False), 500)])
def test_a_whole_answer_that_ends_early_is_its_error_response(error, status):
    answers = _failing(error)
    plan = Plan("r", _plan().gens, 1, ResponseOptions(), [None])
    response = asyncio.run(answers.respond(plan, True, RequestTimer(answers.telemetry)))
    assert response.status_code == status
    assert json.loads(response.body)["error"]["code"] == status
