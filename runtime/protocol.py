"""Every message that crosses a process boundary, defined once. Imports msgspec only.

Structs are tagged and versioned by field order: new fields go last, with defaults. Tensors never
travel inside a Struct; they go as raw frames next to a header (see the vision transport).
"""

from __future__ import annotations

import msgspec


class TokenLogprob(msgspec.Struct, tag="token_logprob", frozen=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class RequestOutput(msgspec.Struct, tag="request_output"):
    """What one engine step produced for one request: the new tokens and the text they complete.

    `text` is a delta: concatenating every output's text gives the whole answer (cut before a stop
    string, never splitting a UTF-8 character). The last output has `finished` set and a
    `finish_reason` of "stop", "length", "abort" or "error" (then `error` says why)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
