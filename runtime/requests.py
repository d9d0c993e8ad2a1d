"""OpenAI chat-completions request bodies -> validated, typed requests.

One parser for the offline CLI and the HTTP router: every rejection is a RequestError naming the
field, which the router turns into a 400 with an OpenAI error body.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as settings

from runtime.errors import RequestError
from runtime.protocol import SamplingParams
from runtime.structured import STRUCTURED_FIELDS, parse_structured
from runtime.tools import (
    check_message_tool_fields,
    constrain,
    parse_parallel_tool_calls,
    parse_tool_choice,
    parse_tools,
)

__all__ = ["ChatRequest", "CompletionRequest", "RequestLimits", "ResponseOptions", "SamplingParams", "TokenizeRequest",
           "check_fields", "parse_chat_request", "parse_completion_request", "parse_count", "parse_detokenize_request",
           "parse_prompts", "parse_response_options", "parse_sampling", "parse_tokenize_request"]

ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_N = 16  # choices per prompt (n)
MAX_PROMPTS = 64  # prompts in one /v1/completions request

# Every body field each endpoint acts on; anything else is refused with a 400 naming it, so no
# field is ever accepted and silently ignored. `user` is an opaque end-user id (metadata).
_COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "ignore_eos", "min_tokens", "logprobs", "n", "stream", "stream_options", "return_token_ids",
    "skip_special_tokens", "user", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "return_routed_experts", *STRUCTURED_FIELDS,
}
SUPPORTED_FIELDS: dict[str, frozenset[str]] = {
    "chat": frozenset(_COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs",
                                        "tools", "tool_choice", "parallel_tool_calls"}),
    "completions": frozenset(_COMMON_FIELDS | {"prompt", "echo"}),
    # vLLM's /tokenize (a prompt, or chat messages rendered as for /v1/chat/completions) and /detokenize.
    "tokenize": frozenset({"model", "prompt", "messages", "add_special_tokens", "return_token_strs",
                           "add_generation_prompt", "chat_template_kwargs", "tools"}),
    "detokenize": frozenset({"model", "tokens"}),
    # SGLang's native /generate (runtime.router.generate_api), and its sampling_params object.
    "generate": frozenset({"model", "text", "input_ids", "sampling_params", "return_logprob", "top_logprobs_num",
                           "logprob_start_len", "stream", "rid", "return_routed_experts"}),
    "generate_sampling": frozenset({
        "max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "sampling_seed",
        "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "json_schema", "regex", "ebnf"}),
}
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "tokenize": "/tokenize",
                  "detokenize": "/detokenize", "generate": "/generate",
                  "generate_sampling": "/generate sampling_params"}
# Fields accepted only at the value that means "off": the runtime implements no penalties.
_NEUTRAL_VALUES: dict[str, Any] = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}


def check_fields(body: dict[str, Any], endpoint: str, prefix: str = "") -> None:
    """Refuse any field this endpoint does not implement, and the penalty fields at any value but off.
    `prefix` names where a nested object sits in the body (the error's field is prefix + name)."""
    unknown = sorted(k for k in body if k not in SUPPORTED_FIELDS[endpoint])
    if unknown:
        path = ENDPOINT_PATHS[endpoint]
        raise RequestError(f"{prefix}{unknown[0]} is not supported by {path} (supported fields: "
                           f"{', '.join(sorted(SUPPORTED_FIELDS[endpoint]))})", prefix + unknown[0])
    for name, neutral in _NEUTRAL_VALUES.items():
        if body.get(name) not in (None, neutral):
            raise RequestError(f"{prefix}{name} is not supported (only {neutral}, which applies no penalty)",
                               prefix + name)
    if body.get("add_generation_prompt") is False:
        raise RequestError("add_generation_prompt false is not supported: prompts end with the assistant's turn "
                           "opened, as /v1/chat/completions renders them", "add_generation_prompt")


def parse_prompts(prompt: Any, vocab_size: int, name: str = "prompt") -> list[str | list[int]]:
    """/v1/completions' prompt: a string, a list of token ids, or a list of either (one choice
    each). Token ids are checked against the vocabulary here; strings are tokenized by the caller."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
        raise RequestError(f"{name} must be a non-empty string, a list of token ids, or a list of at most "
                           f"{MAX_PROMPTS} of either", name)
    for i, p in enumerate(prompt):
        if isinstance(p, str) and p:
            continue
        if not (isinstance(p, list) and p and all(_is_id(t) and t < vocab_size for t in p)):
            raise RequestError(f"{name}[{i}] must be a non-empty string or a non-empty list of token ids in "
                               f"[0, {vocab_size})", name)
    return prompt


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def parse_flag(body: dict[str, Any], name: str) -> bool:
    """A boolean body field; absent or null is false."""
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return value


def parse_count(body: dict[str, Any]) -> int:
    """n: how many choices to sample for each prompt."""
    return _int(body.get("n", 1) if body.get("n") is not None else 1, "n", low=1, high=MAX_N)


@settings(frozen=True, config=ConfigDict(extra="forbid"))
class ContentLimits:
    """What one request may hold; the deploy YAML's `limits:` section is made of it (runtime.settings)."""

    max_images: int = Field(default=16, ge=0)
    max_image_mb: float = Field(default=20.0, gt=0)
    max_stop_strings: int = Field(default=16, ge=0)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)


@settings(frozen=True, config=ConfigDict(extra="forbid"))
class RequestLimits(ContentLimits):
    allow_http_images: bool = False  # http(s) image URLs are fetched by the router (runtime.router.fetch)


@dataclass(frozen=True)
class ChatRequest:
    """messages keep their OpenAI shape, except that image parts carry no bytes (they are in
    `images`, in order of appearance)."""

    messages: list[dict[str, Any]]
    images: list[bytes]
    sampling: SamplingParams
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    # The tools the template declares and the answer may call: None without tools or with tool_choice "none".
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "none"
    parallel_tool_calls: bool = True
    # (image index, field, url) of http(s) images still to fetch; their `images` entry is b"" until then.
    image_urls: tuple[tuple[int, str, str], ...] = ()


@dataclass(frozen=True)
class ResponseOptions:
    """How the answer is shaped (not what is generated): the fields the router's framing reads."""

    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    return_token_ids: bool = False  # vLLM's extension: token ids beside the text
    logprobs: bool = False
    skip_special_tokens: bool = True


def parse_response_options(body: dict[str, Any], sampling: SamplingParams) -> ResponseOptions:
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return ResponseOptions(parse_flag(body, "stream"), bool(stream_options.get("include_usage", False)),
                           parse_flag(body, "return_token_ids"), sampling.logprobs, sampling.skip_special_tokens)


@dataclass(frozen=True)
class CompletionRequest:
    """A /v1/completions body: its prompts (strings still to tokenize, or checked token ids), each
    sampled n times."""

    prompts: list[str | list[int]]
    sampling: SamplingParams
    n: int
    echo: bool
    options: ResponseOptions


def parse_completion_request(body: dict[str, Any], defaults: dict[str, Any], limits: RequestLimits,
                             vocab_size: int) -> CompletionRequest:
    check_fields(body, "completions")
    echo = parse_flag(body, "echo")
    count = _completion_logprobs(body)  # a count of alternatives, not the chat API's boolean
    sampling = parse_sampling(body, defaults, limits, prompt_logprobs=count if echo else None,
                              fewest_tokens=0 if echo else 1, logprobs=(count is not None, count or 0))
    return CompletionRequest(parse_prompts(body.get("prompt"), vocab_size), sampling, parse_count(body), echo,
                             parse_response_options(body, sampling))


@dataclass(frozen=True)
class TokenizeRequest:
    """vLLM's /tokenize: a prompt tokenized as it is, or chat messages rendered as for /v1/chat/completions."""

    prompt: str | ChatRequest  # text to tokenize as it is, or messages to render first
    add_special_tokens: bool  # text only: the tokenizer's own special tokens (BOS) around it
    return_token_strs: bool


def parse_tokenize_request(body: dict[str, Any], defaults: dict[str, Any],
                           limits: RequestLimits) -> TokenizeRequest:
    check_fields(body, "tokenize")
    if ("messages" in body) == ("prompt" in body):
        raise RequestError("give exactly one of prompt or messages", "prompt")
    prompt = body.get("prompt")
    if "prompt" not in body:  # check_fields refused add_generation_prompt false; chat bodies have no such field
        prompt = parse_chat_request({k: v for k, v in body.items() if k != "add_generation_prompt"}, defaults, limits)
    elif not isinstance(prompt, str):
        raise RequestError("prompt must be a string", "prompt")
    return TokenizeRequest(prompt, bool(body.get("add_special_tokens", True)), parse_flag(body, "return_token_strs"))


def parse_detokenize_request(body: dict[str, Any], vocab_size: int) -> list[int]:
    """vLLM's /detokenize: the token ids to decode, each in the vocabulary."""
    check_fields(body, "detokenize")
    tokens = parse_prompts(body.get("tokens"), vocab_size, "tokens")
    if len(tokens) != 1 or not isinstance(tokens[0], list):
        raise RequestError("tokens must be a non-empty list of token ids", "tokens")
    return tokens[0]


def parse_chat_request(
    body: Any, defaults: dict[str, Any] | None = None, limits: RequestLimits = RequestLimits()
) -> ChatRequest:
    """`defaults` are the checkpoint's generation_config sampling values (used where the body is silent)."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    urls: list[tuple[int, str, str]] = []
    messages, images = _parse_messages(body.get("messages"), limits, urls)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    parallel = parse_parallel_tool_calls(body.get("parallel_tool_calls"))
    return ChatRequest(
        messages=messages,
        images=images,
        sampling=constrain(parse_sampling(body, defaults or {}, limits), tools, tool_choice, parallel),
        chat_template_kwargs=dict(kwargs),
        model=body.get("model"),
        tools=None if tool_choice == "none" else tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        image_urls=tuple(urls),
    )


# --- messages ----------------------------------------------------------------------------------


def _parse_messages(raw: Any, limits: RequestLimits,
                    urls: list[tuple[int, str, str]]) -> tuple[list[dict[str, Any]], list[bytes]]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", "messages")
    messages: list[dict[str, Any]] = []
    images: list[bytes] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object", where)
        if msg.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {sorted(ROLES)}", f"{where}.role")
        content = msg.get("content")
        out = dict(msg)
        if isinstance(content, list):
            out["content"] = [_parse_part(p, f"{where}.content[{j}]", images, limits, urls)
                              for j, p in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        check_message_tool_fields(msg, where)
        messages.append(out)
    return messages, images


def _parse_part(part: Any, where: str, images: list[bytes], limits: RequestLimits,
                urls: list[tuple[int, str, str]]) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be an object", where)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text must be a string", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise RequestError(f"{where}.image_url.url must be a string", f"{where}.image_url")
        if len(images) >= limits.max_images:
            raise RequestError(f"too many images: at most {limits.max_images} per request", where)
        field = f"{where}.image_url.url"
        if limits.allow_http_images and url.startswith(("http://", "https://")):
            urls.append((len(images), field, url))
            images.append(b"")  # fetched by the router before the prompt is built
        else:
            images.append(decode_data_url(url, field, limits.max_image_bytes))
        return {"type": "image_url", "image_url": {"url": f"<image {len(images) - 1}>"}}
    raise RequestError(f"{where}.type {kind!r} is not supported (use 'text' or 'image_url')", f"{where}.type")


def decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    if url.startswith(("http://", "https://")):
        raise RequestError("http(s) image URLs are disabled; send the image as a data: URL", where)
    if not url.startswith("data:"):
        raise RequestError("image_url must be a data: URL (data:image/...;base64,...)", where)
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise RequestError("data: URL must be base64-encoded", where)
    if len(payload) * 3 // 4 > max_bytes:
        raise RequestError(f"image is larger than {max_bytes} bytes", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"invalid base64 in data: URL ({e})", where) from e


# --- sampling ----------------------------------------------------------------------------------


def parse_sampling(body: dict[str, Any], defaults: dict[str, Any], limits: RequestLimits,
                   prompt_logprobs: int | None = None, fewest_tokens: int = 1,
                   logprobs: tuple[bool, int] | None = None) -> SamplingParams:
    """fewest_tokens: the smallest max_tokens allowed (0 only where the prompt alone is an answer:
    completions' echo). logprobs: (wanted, alternatives per token); None reads the chat API's
    `logprobs` and `top_logprobs` from the body."""
    wanted, top = _chat_logprobs(body) if logprobs is None else logprobs
    def get(key: str, fallback: Any) -> Any:
        value = body.get(key)
        return defaults.get(key, fallback) if value is None else value

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    field_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    params = SamplingParams(
        max_tokens=None if max_tokens is None else _int(max_tokens, field_name, low=fewest_tokens),
        temperature=_float(get("temperature", 1.0), "temperature", 0.0, 2.0),
        top_p=_float(get("top_p", 1.0), "top_p", 0.0, 1.0, low_open=True),
        top_k=_int(get("top_k", 0), "top_k", low=-1),
        min_p=_float(get("min_p", 0.0), "min_p", 0.0, 1.0),
        seed=None if body.get("seed") is None else _int(body["seed"], "seed", low=-(2**63), high=2**64 - 1),
        stop=_stop_strings(body.get("stop"), limits),
        stop_token_ids=tuple(
            _int(t, "stop_token_ids", low=0) for t in _list(body.get("stop_token_ids"), "stop_token_ids")
        ),
        ignore_eos=_bool(body.get("ignore_eos", False), "ignore_eos"),
        min_tokens=_int(body.get("min_tokens", 0), "min_tokens", low=0),
        logprobs=wanted,
        top_logprobs=top,
        skip_special_tokens=_bool(body.get("skip_special_tokens", True), "skip_special_tokens"),
        prompt_logprobs=prompt_logprobs,
        structured=parse_structured(body),
        return_routed_experts=_bool(body.get("return_routed_experts") or False, "return_routed_experts"),
    )
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise RequestError("min_tokens must not exceed max_tokens", "min_tokens")
    if params.structured is not None and params.min_tokens:  # the grammar decides where the output ends
        raise RequestError("min_tokens cannot be combined with structured output", "min_tokens")
    return params


def _chat_logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    return (_bool(body.get("logprobs", False), "logprobs"),
            _int(body.get("top_logprobs") or 0, "top_logprobs", low=0, high=20))


def _completion_logprobs(body: dict[str, Any]) -> int | None:
    """The completions API's logprobs: a count of alternatives per token (None: none wanted)."""
    count = body.get("logprobs")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 20):
        raise RequestError("logprobs must be an integer in [0, 20]", "logprobs")
    return count


def _int(v: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name} must be an integer", name)
    if (low is not None and v < low) or (high is not None and v > high):
        raise RequestError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], got {v}", name)
    return v


def _float(v: Any, name: str, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RequestError(f"{name} must be a number", name)
    if v > high or v < low or (low_open and v == low):
        raise RequestError(f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {v}", name)
    return float(v)


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return v


def _list(v: Any, name: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise RequestError(f"{name} must be a list", name)
    return v


def _stop_strings(v: Any, limits: RequestLimits) -> tuple[str, ...]:
    stops = [v] if isinstance(v, str) else _list(v, "stop")
    if len(stops) > limits.max_stop_strings or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"stop must be a non-empty string or a list of at most {limits.max_stop_strings}", "stop")
    return tuple(stops)
