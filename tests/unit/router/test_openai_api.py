"""OpenAI wire-format pieces: the reasoning split (also across stream deltas), usage, errors, routed experts."""

from __future__ import annotations

import base64
import json
import random

import msgspec
import numpy as np
import pytest

from runtime.protocol import ErrorKind, ExpertRouting, RequestOutput, TokenLogprob
from runtime.router.openai_api import (
    ERRORS,
    ReasoningSplitter,
    chat_chunk,
    engine_error,
    starts_in_reasoning,
    think_token_ids,
    usage,
    with_routed_experts,
)


def _split_in_pieces(text: str, reasoning: bool, seed: int) -> tuple[str, str]:
    rng, splitter, parts = random.Random(seed), ReasoningSplitter(reasoning), []
    i = 0
    while i < len(text):
        n = rng.randint(1, 4)
        parts.append(splitter.push(text[i:i + n]))
        i += n
    parts.append(splitter.finish())
    return "".join(p[0] for p in parts), "".join(p[1] for p in parts)


@pytest.mark.parametrize("seed", range(20))
def test_reasoning_split_does_not_depend_on_how_the_text_arrives(seed) -> None:
    text = "let me think </thi about it</think>The answer is <b>42</b>. </think"
    assert _split_in_pieces(text, True, seed) == ("let me think </thi about it", "The answer is <b>42</b>. </think")
    assert ReasoningSplitter(True).push(text)[0] == "let me think </thi about it"


def test_reasoning_starts_only_after_an_open_think_in_content_mode() -> None:
    assert _split_in_pieces("plain <think>hidden</think> shown", False, 0) == ("hidden", "plain  shown")
    assert _split_in_pieces("never closed", True, 1) == ("never closed", "")


class FakeTokenizer:
    def get_vocab(self):
        return {"<think>": 7, "</think>": 8}


def test_starts_in_reasoning_reads_the_last_think_tag_of_the_prompt() -> None:
    ids = think_token_ids(FakeTokenizer())
    assert starts_in_reasoning([1, 2, 7], ids)
    assert not starts_in_reasoning([1, 7, 8], ids)
    assert not starts_in_reasoning([1, 2, 3], ids)


def test_usage_and_engine_errors() -> None:
    out = RequestOutput("r", [], "", True, "error", "image 0: truncated", prompt_tokens=10,
                        completion_tokens=3, cached_tokens=4, error_type="invalid_request")
    assert usage([out]) == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                          "prompt_tokens_details": {"cached_tokens": 4}}
    error = engine_error(out)
    assert (error.status, error.type) == (400, "invalid_request_error") and error.body()["error"]["message"]
    timeout = engine_error(RequestOutput("r", [], "", True, "error", "slow", error_type="timeout"))
    assert timeout.status == 504


def test_text_offsets_count_only_visible_characters(checkpoints) -> None:
    """A special token hidden by skip_special_tokens adds no characters; a character split over
    byte-level tokens is counted once; echoed prompts show their special tokens as sent."""
    from transformers import AutoTokenizer

    from runtime.router.openai_api import Echo, completion_logprobs, text_offsets

    tok = AutoTokenizer.from_pretrained(str(checkpoints("tiny")))
    ids = tok("ab")["input_ids"] + tok.convert_tokens_to_ids(["<|im_end|>"]) + tok("c 图片")["input_ids"]
    visible = tok.decode(ids, skip_special_tokens=True)
    offsets = text_offsets(ids, tok, True)
    assert offsets[0] == 0 and offsets == sorted(offsets) and max(offsets) < len(visible)
    special = ids.index(tok.convert_tokens_to_ids("<|im_end|>"))
    assert offsets[special] == offsets[special + 1] == len(tok.decode(ids[:special]))
    shown = text_offsets(ids, tok, False)
    assert shown[special + 1] - shown[special] == len("<|im_end|>")

    prompt = tok("hi<|im_end|>")["input_ids"]
    lp = [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids]
    echoed = completion_logprobs(Echo("hi<|im_end|>", prompt), [TokenLogprob(prompt[1], -2.0)] * (len(prompt) - 1),
                                 lp, ids, tok, True)
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert len(echoed["tokens"]) == len(echoed["text_offset"]) == len(prompt) + len(ids)
    assert echoed["text_offset"][len(prompt)] == len("hi<|im_end|>")


def test_usage_counts_a_prompt_once_for_its_n_choices() -> None:
    outs = [RequestOutput("r", [], "", True, "length", prompt_tokens=p, completion_tokens=c, cached_tokens=0)
            for p, c in ((10, 3), (10, 4), (7, 5), (7, 6))]
    assert usage(outs, n=2)["prompt_tokens"] == 17 and usage(outs, n=2)["completion_tokens"] == 18
    assert usage(outs[:1])["total_tokens"] == 13


def test_routed_experts_wire_format_round_trips() -> None:
    """Engine process -> router (msgspec) -> choice JSON (base64 of little-endian int16) -> client."""
    ids = np.arange(5 * 3 * 2, dtype=np.int16).reshape(5, 3, 2) * 7 - 40  # [tokens, MoE layers, k]
    routing = ExpertRouting((5, 3, 2), ids.astype("<i2").tobytes())
    out = RequestOutput("r", [1], "", True, "length", routed_experts=routing)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=RequestOutput)
    assert wire == out
    body = json.loads(json.dumps(wire.routed_experts.to_json()))
    assert body["shape"] == [5, 3, 2] and body["dtype"] == "int16"
    assert (np.frombuffer(base64.b64decode(body["data"]), "<i2").reshape(body["shape"]) == ids).all()
    chunk = with_routed_experts(chat_chunk("id", "m", 0, {}, "length"), wire)
    assert chunk["choices"][0]["routed_experts"] == body
    plain = with_routed_experts(chat_chunk("id", "m", 0, {"content": "x"}), RequestOutput("r", [1], "x"))
    assert "routed_experts" not in plain["choices"][0]


@pytest.mark.parametrize("kind,status,kind_name", [
    ("invalid_request", 400, "invalid_request_error"),
    ("invalid_image", 400, "invalid_request_error"),
    ("image_too_large", 400, "invalid_request_error"),
    ("timeout", 504, "timeout_error"),
    ("unavailable", 503, "service_unavailable"),
    ("internal", 500, "server_error"),
    (None, 500, "server_error"),
])
def test_each_error_kind_becomes_one_status_and_type(kind, status, kind_name) -> None:
    error = engine_error(RequestOutput("r", [], "", True, "error", "why", error_type=kind))
    assert (error.status, error.type) == (status, kind_name)
    message = "why; request id r" if status == 500 else "why"  # an operator finds our failures by the id
    assert error.body() == {"error": {"message": message, "type": kind_name, "param": None, "code": status}}
    assert error.headers == ({"Retry-After": "5"} if status == 503 else {})


def test_every_error_kind_has_a_status() -> None:
    assert set(ERRORS) == set(ErrorKind)
