"""Structured output through the engine on a random-weight tiny checkpoint: whatever the model
would say, the grammar's mask makes the answer parse; unconstrained neighbours are untouched."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import jsonschema  # installed with ray[serve]
import pytest

from runtime.lm_service.engine import EngineHooks
from runtime.lm_service.engine_client import EngineClient
from runtime.lm_service.offline import OfflineLLM
from runtime.lm_service.request_state import EngineRequest
from runtime.requests import RequestLimits, SamplingParams, parse_sampling
from runtime.settings import EngineConfig
from tests.integration.workload import chat, mixed

SMALL = EngineConfig(kv_cache_mb=8, block_size=4, prefix_caching=False)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
JSON_SCHEMA = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                                          "strict": True}}}


def _params(**body) -> SamplingParams:
    return parse_sampling(body, {}, RequestLimits())


@pytest.fixture(scope="module")
def llm(checkpoints) -> OfflineLLM:
    return OfflineLLM(checkpoints("tiny"), SMALL)


def _ask(llm: OfflineLLM, params: SamplingParams, text: str = "Describe a person as JSON.") -> tuple[str, str]:
    result = llm.generate(chat(text, [], params))
    assert result.error is None
    return result.text, result.finish_reason or ""


@pytest.mark.parametrize("sampling", [{"temperature": 1.0, "seed": 11}, {"temperature": 1.0, "seed": 12},
                                      {"temperature": 0.0}])
def test_json_schema_output_parses_and_validates(llm: OfflineLLM, sampling: dict) -> None:
    text, reason = _ask(llm, _params(**JSON_SCHEMA, **sampling, max_tokens=200))
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), {**SCHEMA, "additionalProperties": False})
    assert not llm.engine.grammars.live  # released with the request


def test_choice_and_regex_forms(llm: OfflineLLM) -> None:
    choices = ["red", "green", "sky blue", 'say "hi"']
    for seed in range(4):
        text, reason = _ask(llm, _params(structured_outputs={"choice": choices}, seed=seed, max_tokens=20))
        assert (text, reason) in {(c, "stop") for c in choices}
        text, reason = _ask(llm, _params(guided_regex="[0-9]{3}-[a-z]{2,4}", seed=seed, max_tokens=20))
        assert re.fullmatch("[0-9]{3}-[a-z]{2,4}", text) and reason == "stop", text


def test_unconstrained_neighbours_sample_as_if_alone(llm: OfflineLLM) -> None:
    plain = mixed(5, seed=3)
    constrained = [chat("Who?", [], _params(**JSON_SCHEMA, seed=i, max_tokens=120)) for i in range(3)]
    constrained.append(chat("Colour?", [], _params(structured_outputs={"choice": ["red", "blue"]}, temperature=0.0)))
    for i, r in enumerate(plain):
        llm.submit(f"plain-{i}", r)
    alone = llm.run()
    for i, r in enumerate(constrained):
        llm.submit(f"constrained-{i}", r)
        llm.submit(f"plain-{i}", plain[i])
    llm.submit("plain-4", plain[4])
    together = llm.run()
    for i in range(len(plain)):
        assert together[f"plain-{i}"].token_ids == alone[f"plain-{i}"].token_ids
    for i in range(3):
        jsonschema.validate(json.loads(together[f"constrained-{i}"].text), SCHEMA)
    assert together["constrained-3"].text in {"red", "blue"}


def test_a_rejected_token_fails_that_request_only(checkpoints) -> None:
    llm = OfflineLLM(checkpoints("tiny"), SMALL)
    llm.engine.grammars.mask = lambda states, logits: {}  # type: ignore[method-assign]  # what must not happen
    llm.submit("bad", chat("Digits?", [], _params(guided_regex="7{20}", temperature=0.0, max_tokens=8)))
    llm.submit("fine", mixed(1, seed=4)[0])
    results = llm.run()
    assert results["bad"].finish_reason == "error" and "grammar rejected" in (results["bad"].error or "")
    assert results["fine"].finish_reason in {"stop", "length"} and results["fine"].error is None
    assert not llm.engine.grammars.live and not llm.engine.states


def test_abort_releases_the_matcher_and_logprobs_stay_finite(llm: OfflineLLM) -> None:
    llm.submit("gone", chat("Who?", [], _params(**JSON_SCHEMA, max_tokens=50)))
    llm.step()
    assert "gone" in llm.engine.grammars.live
    llm.abort("gone")
    assert not llm.engine.grammars.live
    llm.run()
    params = _params(**JSON_SCHEMA, seed=5, max_tokens=200, logprobs=True, top_logprobs=3)
    result = llm.generate(chat("Who?", [], params))
    assert result.logprobs and all(lp["logprob"] > float("-inf") for lp in result.logprobs)
    assert all(v > float("-inf") for lp in result.logprobs for _, v in lp["top"])  # the model's own row


def test_length_cut_still_ends_cleanly(llm: OfflineLLM) -> None:
    short = dataclasses.replace(chat("Who?", [], _params(**JSON_SCHEMA, seed=1, max_tokens=3)))
    result = llm.generate(short)
    assert result.finish_reason == "length" and len(result.token_ids) == 3 and result.text.startswith("{")


def test_the_engine_process_enforces_the_same_grammar(checkpoints, llm: OfflineLLM) -> None:
    """The spec crosses to the engine-core process inside SamplingParams and is compiled there."""
    params = [_params(**JSON_SCHEMA, seed=7, max_tokens=200), _params(guided_choice=["left", "right"], seed=2)]
    requests = [chat("Who?", [], p) for p in params]
    expected = [llm.generate(r, f"in-process-{i}").text for i, r in enumerate(requests)]
    client = EngineClient(str(checkpoints("tiny")), SMALL, EngineHooks(), "127.0.0.1")

    async def one(i: int) -> tuple[str, str | None]:
        ids = llm.prompts.token_ids(requests[i].messages, [])
        text, reason = "", None
        async for out in client.add_request(EngineRequest(f"r{i}", ids, params[i])):
            text, reason = text + out.text, out.finish_reason
        return text, reason

    async def main() -> list[tuple[str, str | None]]:
        return await asyncio.gather(one(0), one(1))

    try:
        results = asyncio.run(main())
    finally:
        client.close()
    assert results == [(text, "stop") for text in expected]


def test_min_tokens_given_past_the_router_yields_to_the_grammar(llm: OfflineLLM) -> None:
    """The router refuses the pair; an engine caller that sends it gets the grammar's end, not a crash."""
    params = SamplingParams(temperature=0.0, min_tokens=10, max_tokens=20,
                            structured=_params(guided_choice=["yes", "no"]).structured)
    text, reason = _ask(llm, params)
    assert text in {"yes", "no"} and reason == "stop"
