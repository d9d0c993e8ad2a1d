"""SGLang's /generate body and answer shapes (runtime.router.generate_api)."""

from __future__ import annotations

import pytest

from runtime.errors import RequestError
from runtime.protocol import RequestOutput, TokenLogprob
from runtime.requests import RequestLimits
from runtime.router.generate_api import MAX_NEW_TOKENS, answer, finish_reason, parse_generate, sample_ids


def parse(body: dict):
    return parse_generate(body, {}, RequestLimits(), vocab_size=100)


def test_sglang_names_map_onto_the_sampling_settings() -> None:
    gen = parse({"input_ids": [1, 2, 3], "return_logprob": True, "rid": "r1",
                 "sampling_params": {"max_new_tokens": 5, "temperature": 0, "stop_token_ids": [7], "n": 3,
                                     "sampling_seed": 11, "min_new_tokens": 2, "ignore_eos": True}})
    assert gen.prompts == [[1, 2, 3]] and gen.field == "input_ids" and not gen.batched
    s = gen.sampling
    assert (s.max_tokens, s.temperature, s.stop_token_ids, s.seed, s.min_tokens, s.ignore_eos) == (5, 0.0, (7,), 11,
                                                                                                 2, True)
    assert gen.n == 3 and s.logprobs and gen.return_logprob and gen.rid == "r1"
    assert parse({"text": "hi"}).sampling.max_tokens == MAX_NEW_TOKENS
    batch = parse({"text": ["a", "b"]})
    assert batch.batched and batch.prompts == ["a", "b"]
    assert parse({"input_ids": [[1], [2, 3]]}).prompts == [[1], [2, 3]]


@pytest.mark.parametrize("body,field", [
    ({"text": "a", "input_ids": [1]}, "text"),
    ({}, "text"),
    ({"text": "a", "bogus": 1}, "bogus"),
    ({"text": "a", "sampling_params": {"max_new_tokens": 0}}, "sampling_params.max_new_tokens"),
    ({"text": "a", "sampling_params": {"best_of": 2}}, "sampling_params.best_of"),
    ({"text": "a", "sampling_params": {"frequency_penalty": 0.5}}, "sampling_params.frequency_penalty"),
    ({"text": "a", "sampling_params": {"n": 0}}, "sampling_params.n"),
    ({"input_ids": [1, 500]}, "input_ids"),
    ({"input_ids": "abc"}, "input_ids"),
    ({"text": "a", "logprob_start_len": 0}, "logprob_start_len"),
    ({"text": "a", "stream": "yes"}, "stream"),
])
def test_bad_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as e:
        parse(body)
    assert e.value.field == field


def test_answer_has_sglang_meta_info() -> None:
    gen = parse({"input_ids": [1, 2], "return_logprob": True, "top_logprobs_num": 1})
    last = RequestOutput("r", [9], "b", True, "length", prompt_tokens=2, completion_tokens=2, cached_tokens=1)
    logprobs = [TokenLogprob(8, -0.5, [(8, -0.5)]), TokenLogprob(9, -1.0, [(3, -0.2)])]
    out = answer("r", "ab", [8, 9], logprobs, last, gen, 4)
    assert out["text"] == "ab" and out["output_ids"] == [8, 9]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 2} and meta["weight_version"] == "4"
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["cached_tokens"]) == (2, 2, 1)
    assert meta["output_token_logprobs"] == [[-0.5, 8, None], [-1.0, 9, None]]
    assert meta["output_top_logprobs"] == [[[-0.5, 8, None]], [[-0.2, 3, None]]]
    assert finish_reason(RequestOutput("r", [], "", False)) is None
    assert finish_reason(RequestOutput("r", [], "", True, "stop")) == {"type": "stop"}
    assert finish_reason(RequestOutput("r", [], "", True, "abort"))["type"] == "abort"
    assert sample_ids("x", 1, 1) == ["x"] and sample_ids("x", 2, 2) == ["x-0", "x-1", "x-2", "x-3"]


def test_routed_experts_are_asked_for_and_answered_in_meta_info() -> None:
    """Routing replay through /generate: the final answer's meta_info carries the routing matrix."""
    import base64

    from runtime.protocol import ExpertRouting

    gen = parse({"input_ids": [1, 2], "return_routed_experts": True})
    assert gen.sampling.return_routed_experts and not parse({"input_ids": [1]}).sampling.return_routed_experts
    routing = ExpertRouting((2, 1, 2), bytes([1, 0, 2, 0, 3, 0, 4, 0]))
    last = RequestOutput("r", [9], "b", True, "stop", prompt_tokens=2, completion_tokens=1, routed_experts=routing)
    meta = answer("r", "b", [9], [], last, gen, 0)["meta_info"]
    assert meta["routed_experts"]["shape"] == [2, 1, 2]
    assert base64.b64decode(meta["routed_experts"]["data"]) == routing.data
    with pytest.raises(RequestError) as info:
        parse({"input_ids": [1], "return_routed_experts": "yes"})
    assert info.value.field == "return_routed_experts"
