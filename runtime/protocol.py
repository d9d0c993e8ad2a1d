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


# --- vision pool -> LM replica, over ZMQ (a header frame, then the raw tensor frame) ----------


class EmbeddingHeader(msgspec.Struct, tag="embedding", frozen=True):
    """Describes the raw frame that follows: one image's embeddings [tokens, hidden]."""

    request_id: str
    image_index: int
    content_hash: str
    dtype: str  # torch dtype name without the prefix, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    sender: str  # the vision replica that holds the cache reference (where release goes)


class EncodeError(msgspec.Struct, tag="encode_error", frozen=True):
    """Encoding one image of a request failed; the LM replica fails that request alone."""

    request_id: str
    image_index: int
    message: str
    error_type: str  # "invalid_image" | "image_too_large" | "internal"
    sender: str


VisionMessage = EmbeddingHeader | EncodeError


# --- LM replica -> vision replica ----------------------------------------------------------------


class ImagePayload(msgspec.Struct, tag="image", frozen=True):
    data: bytes
    placeholders: int  # the router's placeholder_count for this image


class EncodeRequest(msgspec.Struct, tag="encode_request", frozen=True):
    """Handle call to the vision pool: encode these images and push them to reply_to."""

    request_id: str
    images: list[ImagePayload]
    reply_to: str


class EncodeAccepted(msgspec.Struct, tag="encode_accepted", frozen=True):
    sender: str  # the replica's release address (also in every EmbeddingHeader it pushes)
    encoded: int  # images pushed as embeddings; the rest were pushed as EncodeErrors


class ReleaseRequest(msgspec.Struct, tag="release", frozen=True):
    """Pushed over ZMQ to the `sender` address of the vision replica that holds the references."""

    request_id: str
