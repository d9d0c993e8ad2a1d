"""OpenAI wire format: error bodies, chat and completion responses, SSE chunks, reasoning split.

Pure functions over RequestOutputs, so the HTTP layer only moves bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from runtime.lm_service.detokenize import IncrementalDetokenizer
from runtime.protocol import ErrorKind, RequestOutput, TokenLogprob

if TYPE_CHECKING:  # runtime.router.assistant imports this module
    from runtime.router.assistant import AssistantStream

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# --- errors ------------------------------------------------------------------------------------


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.status)


def error_body(message: str, kind: str, param: str | None = None, code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Every error kind -> (HTTP status, OpenAI error type): the one place a kind becomes HTTP.
ERRORS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.INVALID_IMAGE: (400, "invalid_request_error"),
    ErrorKind.IMAGE_TOO_LARGE: (400, "invalid_request_error"),
    ErrorKind.TIMEOUT: (504, "timeout_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


def kind_error(kind: ErrorKind | None, message: str) -> ApiError:
    """An error of this kind as the client gets it (no kind: INTERNAL). A 503 says when to retry."""
    status, kind_name = ERRORS[kind or ErrorKind.INTERNAL]
    return ApiError(status, message, kind_name, headers={"Retry-After": "5"} if status == 503 else {})


def engine_error(out: RequestOutput) -> ApiError:
    """An INTERNAL error names the request, so that an operator finds its lines in the logs."""
    message = out.error or "the request failed"
    if (out.error_type or ErrorKind.INTERNAL) == ErrorKind.INTERNAL:
        message += f"; request id {out.request_id}"
    return kind_error(out.error_type, message)


# --- reasoning -----------------------------------------------------------------------------------


class ReasoningSplitter:
    """Kimi's `<think>...</think>`: text before the closing tag is reasoning, the rest is content.

    Streaming-safe: a tag split across deltas is held back until it is complete. `reasoning` says
    whether the answer starts inside a think block (the prompt ended with an open `<think>`)."""

    def __init__(self, reasoning: bool):
        self.in_reasoning = reasoning
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        """-> (reasoning delta, content delta)."""
        text = self._held + text
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            at = text.find(tag)
            if at < 0:
                keep = _partial_suffix(text, tag)
                out, self._held = text[: len(text) - keep], text[len(text) - keep:]
                (reasoning if self.in_reasoning else content).append(out)
                break
            (reasoning if self.in_reasoning else content).append(text[:at])
            text = text[at + len(tag):]
            self.in_reasoning = not self.in_reasoning
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.in_reasoning else ("", held)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def think_token_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(<think>, </think>) ids, or None where the vocabulary lacks them. Once per router: building
    the vocabulary dict costs milliseconds on a real tokenizer."""
    vocab = tokenizer.get_vocab()
    return vocab.get(THINK_OPEN), vocab.get(THINK_CLOSE)


def starts_in_reasoning(prompt_ids: list[int], think_ids: tuple[int | None, int | None]) -> bool:
    """Whether the rendered prompt leaves the model inside an open think block."""
    open_id, close_id = think_ids
    if open_id is None:
        return False
    last_open = max((i for i, t in enumerate(prompt_ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(prompt_ids) if t == close_id), default=-1)
    return last_open > last_close


@dataclass(frozen=True)
class Echo:
    """Completions' echo: the prompt's text and ids put before the answer."""

    text: str
    token_ids: list[int]


# --- logprobs ------------------------------------------------------------------------------------


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Any) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, p) for t, p in lp.top]}
                        for lp in logprobs]}


def completion_logprobs(echo: Echo | None, prompt_logprobs: list[TokenLogprob] | None, logprobs: list[TokenLogprob],
                        token_ids: list[int], tokenizer: Any, skip_special_tokens: bool, start: int = 0
                        ) -> dict[str, Any]:
    """The completions API's logprobs for these generated tokens, after the echoed prompt if any
    (its first token has no logprob). text_offset: where each token's text begins in the choice's
    text, of which `start` characters came before. The echoed prompt's text shows its special
    tokens (it is the prompt as sent); the answer's follows skip_special_tokens."""
    entries: list[TokenLogprob | None] = list(logprobs)
    ids, offsets = token_ids, text_offsets(token_ids, tokenizer, skip_special_tokens,
                                           start + (len(echo.text) if echo else 0))
    if echo is not None:
        entries = [None, *(prompt_logprobs or [])] + entries
        ids = echo.token_ids + ids
        offsets = text_offsets(echo.token_ids, tokenizer, False, start) + offsets
    return {
        "tokens": [tokenizer.decode([t]) for t in ids],
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {tokenizer.decode([t]): p for t, p in e.top} for e in entries],
        "text_offset": offsets,
    }


def text_offsets(token_ids: list[int], tokenizer: Any, skip_special_tokens: bool, start: int = 0) -> list[int]:
    """Each token's start in the visible text: the characters emitted before it, so a special token
    hidden by skip_special_tokens adds none, and a character split over tokens counts once."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    offsets, at = [], start
    for token in token_ids:
        offsets.append(at)
        at += len(detok.push([token]))
    return offsets


# --- responses -----------------------------------------------------------------------------------


def usage(outs: list[RequestOutput], n: int = 1) -> dict[str, Any]:
    """Token counts of a response: completion tokens of every choice, prompt tokens once per prompt
    (`outs` lists each prompt's n choices together, and they share its prompt)."""
    per_prompt = outs[::n]
    prompt_tokens = sum(o.prompt_tokens for o in per_prompt)
    completion = sum(o.completion_tokens for o in outs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in per_prompt)},
    }


@dataclass
class Completion:
    """A whole answer gathered from its outputs."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.last = out


# --- routed experts ------------------------------------------------------------------------------


def with_routed_experts(chunk: dict[str, Any], out: RequestOutput) -> dict[str, Any]:
    """A streamed chunk of `out`: its (only) choice carries the routed experts when out has them
    (the final chunk of a request that asked)."""
    if out.routed_experts is not None:
        chunk["choices"][0]["routed_experts"] = out.routed_experts.to_json()
    return chunk


def chat_choice(index: int, done: Completion, stream: AssistantStream, want_logprobs: bool,
                return_token_ids: bool, tokenizer: Any) -> dict[str, Any]:
    """`stream`: a fresh AssistantStream of this choice (reasoning split, tool calls)."""
    assert done.last is not None
    message = stream.message(done.text)  # before finish_reason: it counts the calls parsed
    reason = stream.finish_reason(done.last.finish_reason)
    choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": reason,
                              "logprobs": chat_logprobs(done.logprobs, tokenizer) if want_logprobs else None}
    return _extras(choice, done, return_token_ids)


def _extras(choice: dict[str, Any], done: Completion, return_token_ids: bool) -> dict[str, Any]:
    if return_token_ids:
        choice["token_ids"] = done.token_ids
    if done.last is not None and done.last.routed_experts is not None:
        choice["routed_experts"] = done.last.routed_experts.to_json()
    return choice


def completion_choice(index: int, done: Completion, want_logprobs: bool, return_token_ids: bool, tokenizer: Any,
                      skip_special_tokens: bool, echo: Echo | None) -> dict[str, Any]:
    assert done.last is not None
    text = done.text if echo is None else echo.text + done.text
    logprobs = None
    if want_logprobs:
        logprobs = completion_logprobs(echo, done.prompt_logprobs, done.logprobs, done.token_ids, tokenizer,
                                       skip_special_tokens)
    choice: dict[str, Any] = {"index": index, "text": text, "finish_reason": done.last.finish_reason,
                              "logprobs": logprobs}
    return _extras(choice, done, return_token_ids)


def response(rid: str, model: str, kind: str, choices: list[dict[str, Any]], dones: list[Completion], n: int,
             prompt_ids: list[int] | None) -> dict[str, Any]:
    """The envelope around the choices; with prompt_ids, vLLM's return_token_ids field."""
    lasts = [d.last for d in dones if d.last is not None]
    body: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                            "choices": choices, "usage": usage(lasts, n)}
    if prompt_ids is not None:
        body["prompt_token_ids"] = prompt_ids
    return body


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None = None,
               logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
               index: int = 0) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None,
                     logprobs: dict[str, Any] | None = None, token_ids: list[int] | None = None,
                     index: int = 0) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
