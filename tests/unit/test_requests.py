from __future__ import annotations

import base64

import pytest

from runtime.errors import RequestError
from runtime.requests import (
    MAX_N,
    MAX_PROMPTS,
    RequestLimits,
    ResponseOptions,
    check_fields,
    parse_chat_request,
    parse_completion_request,
    parse_count,
    parse_detokenize_request,
    parse_prompts,
    parse_tokenize_request,
)

PNG = base64.b64encode(b"\x89PNG fake bytes").decode()


def _body(**kw) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], **kw}


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [_image_part("http://x/y.png")]}]},
         "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [_image_part("data:image/png;base64,@@@")]}]},
         "messages[0].content[0].image_url.url"),
        (_body(temperature=3), "temperature"),
        (_body(temperature="hot"), "temperature"),
        (_body(top_p=0), "top_p"),
        (_body(top_k=-2), "top_k"),
        (_body(min_p=1.5), "min_p"),
        (_body(max_tokens=0), "max_tokens"),
        (_body(max_completion_tokens=True), "max_completion_tokens"),
        (_body(stop=[1]), "stop"),
        (_body(top_logprobs=21), "top_logprobs"),
        (_body(min_tokens=5, max_tokens=2), "min_tokens"),
        (_body(chat_template_kwargs=[1]), "chat_template_kwargs"),
        (_body(return_routed_experts="yes"), "return_routed_experts"),
    ],
)
def test_invalid_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat_request(body)
    assert info.value.field == field


def test_images_are_decoded_in_order_and_kept_out_of_messages() -> None:
    urls = [f"data:image/png;base64,{base64.b64encode(bytes([i]) * 4).decode()}" for i in range(3)]
    req = parse_chat_request({"messages": [{"role": "user", "content": [_image_part(u) for u in urls]}]})
    assert req.images == [bytes([i]) * 4 for i in range(3)]
    assert "base64" not in str(req.messages)


def test_image_count_and_size_limits() -> None:
    parts = [_image_part(f"data:image/png;base64,{PNG}")] * 3
    with pytest.raises(RequestError, match="too many images"):
        parse_chat_request({"messages": [{"role": "user", "content": parts}]}, limits=RequestLimits(max_images=2))
    with pytest.raises(RequestError, match="larger than"):
        parse_chat_request({"messages": [{"role": "user", "content": parts[:1]}]},
                           limits=RequestLimits(max_image_mb=4 / 2**20))


def test_defaults_from_generation_config_fill_only_missing_fields() -> None:
    defaults = {"temperature": 0.6, "top_p": 0.95}
    assert parse_chat_request(_body(), defaults).sampling.temperature == 0.6
    req = parse_chat_request(_body(temperature=0, stop="END", ignore_eos=True, top_k=5), defaults)
    s = req.sampling
    assert (s.temperature, s.top_p, s.stop, s.ignore_eos, s.top_k, s.greedy) == (0.0, 0.95, ("END",), True, 5, True)


@pytest.mark.parametrize(
    "endpoint,body,field",
    [
        ("chat", _body(logit_bias={"1": 5}), "logit_bias"),
        ("chat", _body(prompt="x"), "prompt"),
        ("chat", _body(presence_penalty=0.5), "presence_penalty"),
        ("chat", _body(repetition_penalty=1.1), "repetition_penalty"),
        ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("completions", {"prompt": "x", "messages": []}, "messages"),
        ("completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ],
)
def test_unsupported_fields_are_refused_by_name(endpoint: str, body: dict, field: str) -> None:
    with pytest.raises(RequestError) as info:
        check_fields(body, endpoint)
    assert info.value.field == field and field in str(info.value)


def test_neutral_values_of_unsupported_knobs_are_accepted() -> None:
    check_fields(_body(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1.0, user="u",
                       response_format={"type": "text"}, tool_choice="auto"), "chat")
    check_fields({"prompt": "x", "echo": True, "repetition_penalty": 1.0, "n": 2}, "completions")


def test_n_is_bounded() -> None:
    assert parse_count({}) == 1 and parse_count({"n": None}) == 1 and parse_count({"n": MAX_N}) == MAX_N
    for bad in (0, MAX_N + 1, 1.5, True):
        with pytest.raises(RequestError) as info:
            parse_count({"n": bad})
        assert info.value.field == "n"


def test_completion_prompts_are_one_or_a_list() -> None:
    assert parse_prompts("hi", 10) == ["hi"]
    assert parse_prompts([1, 2], 10) == [[1, 2]]
    assert parse_prompts(["a", [3], "b"], 10) == ["a", [3], "b"]
    for bad in ("", [], [[]], [1, 10], [[1], ""], ["a"] * (MAX_PROMPTS + 1), [True], 5, [[-1]]):
        with pytest.raises(RequestError) as info:
            parse_prompts(bad, 10)
        assert info.value.field == "prompt"


def test_the_readme_lists_exactly_the_supported_fields() -> None:
    from pathlib import Path

    from runtime.requests import ENDPOINT_PATHS, SUPPORTED_FIELDS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): {f.strip(" `") for f in line.split("|")[2].split(",")}
            for line in readme.splitlines() if line.startswith("| `/")}
    assert rows == {ENDPOINT_PATHS[k]: set(v) for k, v in SUPPORTED_FIELDS.items()}


def test_return_routed_experts_is_a_flag_that_skips_the_prefix_cache() -> None:
    assert not parse_chat_request(_body()).sampling.return_routed_experts
    asked = parse_chat_request(_body(return_routed_experts=True)).sampling
    assert asked.return_routed_experts and not asked.reads_prefix_cache
    assert parse_chat_request(_body()).sampling.reads_prefix_cache


def test_a_completion_body_parses_into_one_typed_request() -> None:
    """The completions API's logprobs is a count of alternatives; with echo, the prompt's too."""
    body = {"prompt": ["a", [5, 6]], "logprobs": 3, "echo": True, "max_tokens": 0, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    req = parse_completion_request(body, {}, RequestLimits(), vocab_size=100)
    assert req.prompts == ["a", [5, 6]] and req.n == 2 and req.echo
    assert (req.sampling.logprobs, req.sampling.top_logprobs, req.sampling.prompt_logprobs) == (True, 3, 3)
    assert req.options == ResponseOptions(stream=True, include_usage=True, logprobs=True)
    plain = parse_completion_request({"prompt": "a"}, {}, RequestLimits(), vocab_size=100)
    assert (plain.sampling.logprobs, plain.sampling.top_logprobs, plain.sampling.prompt_logprobs) == (False, 0, None)
    assert plain.options == ResponseOptions()


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "a", "logprobs": True}, "logprobs"), ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "stream_options": 1}, "stream_options"),
    ({"prompt": "a", "top_logprobs": 2}, "top_logprobs"), ({"prompt": []}, "prompt"),
])
def test_bad_completion_bodies_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_completion_request(body, {}, RequestLimits(), vocab_size=100)
    assert e.value.field == field


# --- /tokenize and /detokenize -------------------------------------------------------------------


@pytest.mark.parametrize("body,field,message", [
    ({}, "prompt", "give exactly one of prompt or messages"),
    ({"prompt": "hi", **_body()}, "prompt", "give exactly one of prompt or messages"),
    ({"prompt": None}, "prompt", "prompt must be a string"),
    ({"prompt": ["hi"]}, "prompt", "prompt must be a string"),
    ({"messages": []}, "messages", "messages must be a non-empty list"),
    ({"prompt": "hi", "max_tokens": 3}, "max_tokens", "max_tokens is not supported by /tokenize"),
    ({**_body(), "add_generation_prompt": False}, "add_generation_prompt", "add_generation_prompt false"),
    ({"prompt": "hi", "return_token_strs": "yes"}, "return_token_strs", "return_token_strs must be a boolean"),
])
def test_tokenize_refuses_a_body_naming_the_field(body, field, message):
    with pytest.raises(RequestError) as e:
        parse_tokenize_request(body, {}, RequestLimits())
    assert e.value.field == field and str(e.value).startswith(message)


def test_tokenize_reads_a_prompt_or_chat_messages():
    text = parse_tokenize_request({"prompt": "hi", "add_special_tokens": 0, "return_token_strs": True}, {},
                                  RequestLimits())
    assert (text.prompt, text.add_special_tokens, text.return_token_strs) == ("hi", False, True)
    chat = parse_tokenize_request({**_body(), "add_generation_prompt": True}, {}, RequestLimits())
    assert not isinstance(chat.prompt, str) and chat.prompt.messages == _body()["messages"]
    assert (chat.add_special_tokens, chat.return_token_strs) == (True, False)


@pytest.mark.parametrize("tokens", [None, [], "hi", ["hi"], [[1], [2]], [1, 99], [1, -1], [True]])
def test_detokenize_refuses_anything_but_one_list_of_ids_in_the_vocabulary(tokens):
    with pytest.raises(RequestError) as e:
        parse_detokenize_request({"tokens": tokens}, vocab_size=50)
    assert e.value.field == "tokens"


def test_detokenize_reads_the_ids_and_refuses_other_fields():
    assert parse_detokenize_request({"model": "m", "tokens": [1, 2, 49]}, vocab_size=50) == [1, 2, 49]
    assert parse_detokenize_request({"tokens": [[1, 2]]}, vocab_size=50) == [1, 2]  # one prompt's ids, nested
    with pytest.raises(RequestError, match="prompt is not supported by /detokenize"):
        parse_detokenize_request({"tokens": [1], "prompt": "x"}, vocab_size=50)
