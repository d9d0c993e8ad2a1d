"""Every message that crosses a process boundary, defined once. Imports msgspec (and the standard
library) only.

Structs are tagged and versioned by field order: new fields go last, with defaults. Tensors never
travel inside a Struct; they go as raw frames next to a header (see the vision transport).
"""

from __future__ import annotations

import base64
import enum
from typing import Any

import msgspec


class ErrorKind(enum.StrEnum):
    """Why something failed, as every message that carries an error names it. The router alone
    turns a kind into an HTTP status and an OpenAI error type (runtime.router.openai_api.ERRORS).
    A StrEnum: it travels as its value, and compares equal to it."""

    INVALID_REQUEST = "invalid_request"  # the client's fault: nothing can make this request run
    INVALID_IMAGE = "invalid_image"  # an image that cannot be decoded, or not the one the router measured
    IMAGE_TOO_LARGE = "image_too_large"  # an image over the pixel limit, or larger than the whole cache
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"  # the LM replica sleeps (runtime.lm_service.admin): retry later
    INTERNAL = "internal"  # our fault: the log of the replica that failed has the details

    def of_request(self) -> ErrorKind:
        """The kind a request ends with when one of its images fails this way: a bad image makes
        a bad request (the message names the image)."""
        return ErrorKind.INVALID_REQUEST if self in _CLIENT_IMAGE_KINDS else self


_CLIENT_IMAGE_KINDS = frozenset({ErrorKind.INVALID_IMAGE, ErrorKind.IMAGE_TOO_LARGE})


class TokenLogprob(msgspec.Struct, tag="token_logprob", frozen=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class StructuredOutput(msgspec.Struct, tag="structured_output", frozen=True):
    """A grammar the output must match (runtime.structured builds and checks it).

    kind "json": `text` is a JSON schema; "regex": a regular expression; "choice": a JSON list of
    the allowed strings; "grammar": a Lark or GBNF grammar."""

    kind: str
    text: str


class SamplingParams(msgspec.Struct, tag="sampling", frozen=True):
    """Validated sampling settings of one request (runtime.requests.parse_sampling builds them)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    # Log-probabilities of the prompt's own tokens (positions 1..n-1) and this many alternatives
    # each, computed in the prefill; None: not wanted. Such a request skips the prefix cache.
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None
    # Record the expert ids every MoE layer's gate picked for every token that passed through the
    # model (RL routing replay). Such a request skips the prefix cache too.
    return_routed_experts: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def reads_prefix_cache(self) -> bool:
        """False when every prompt position must run in this request's own forwards: its prompt
        logprobs or its routed experts are wanted."""
        return self.prompt_logprobs is None and not self.return_routed_experts


class ExpertRouting(msgspec.Struct, tag="expert_routing", frozen=True):
    """The experts each token was routed to: `data` is a little-endian int16 array of `shape`
    [tokens, MoE layers, experts per token]: for every position that passed through the model
    (the prompt, then every generated token but the last), for every MoE layer in order, the
    global ids of the experts its gate picked, in the gate's order."""

    shape: tuple[int, int, int]
    data: bytes
    dtype: str = "int16"

    def to_json(self) -> dict[str, Any]:
        """As a response carries it (a choice's `routed_experts`): the array as base64, read back by
        `np.frombuffer(base64.b64decode(data), "<i2").reshape(shape)`."""
        return {"shape": list(self.shape), "dtype": self.dtype, "data": base64.b64encode(self.data).decode()}


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
    # With finish_reason "error": why (a bad image ends its request as INVALID_REQUEST).
    error_type: ErrorKind | None = None
    # On the request's first output when SamplingParams.prompt_logprobs is set: one entry per
    # prompt position 1..n-1 (position 0 has no logprob).
    prompt_logprobs: list[TokenLogprob] | None = None
    # On the request's last output when SamplingParams.return_routed_experts is set (and it did not fail).
    routed_experts: ExpertRouting | None = None
    weights_version: int = 0  # the LM weights that computed it (bumped by /admin/update_weights)
    # Set on the copy of a request's last output that tells its LM replica the request ended,
    # when the engine core sent every output straight to the router (GenerateRequest.reply_to).
    relayed: bool = False


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and logprobs joined, the rest from
    the last."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    return msgspec.structs.replace(
        last,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        logprobs=logprobs if any(o.logprobs is not None for o in outputs) else None,
    )


class TokenBatch(msgspec.Struct, tag="token_batch", frozen=True):
    """Engine core -> a router's token inbox, over ZMQ: one step's outputs for that router's requests."""

    outputs: list[RequestOutput]


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
    error_type: ErrorKind  # INVALID_IMAGE, IMAGE_TOO_LARGE or INTERNAL
    sender: str


VisionMessage = EmbeddingHeader | EncodeError


# --- LM replica -> vision replica ----------------------------------------------------------------


class ImagePayload(msgspec.Struct, tag="image", frozen=True):
    data: bytes
    placeholders: int  # the router's placeholder_count for this image
    key: str  # the router's runtime.images.image_key: computed once, where the request enters


class EncodeRequest(msgspec.Struct, tag="encode_request", frozen=True):
    """Handle call to the vision pool: encode these images and push them to reply_to.

    `image_indexes` are the images' indexes within the request (default 0..n-1); a re-encode after
    preemption asks for a subset."""

    request_id: str
    images: list[ImagePayload]
    reply_to: str
    image_indexes: list[int] | None = None

    def indexes(self) -> list[int]:
        return list(range(len(self.images))) if self.image_indexes is None else list(self.image_indexes)


class EncodeAccepted(msgspec.Struct, tag="encode_accepted", frozen=True):
    sender: str  # the replica's release address (also in every EmbeddingHeader it pushes)
    encoded: int  # images pushed as embeddings; the rest were pushed as EncodeErrors


class ReleaseRequest(msgspec.Struct, tag="release", frozen=True):
    """Pushed over ZMQ to the `sender` address of the vision replica that holds the references."""

    request_id: str


# --- router -> LM replica (a Serve handle call, streaming RequestOutputs back) -------------------


class GenerateRequest(msgspec.Struct, tag="generate_request", frozen=True):
    """A validated, tokenized request. `prompt_ids` already hold each image's placeholder run;
    each image carries its content key (prefix-cache identity and routing affinity)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    images: list[ImagePayload] = []
    # A router's token inbox: the engine core pushes the outputs there itself, and the LM replica's
    # stream carries only errors it made and the `relayed` end (runtime.router.token_inbox).
    reply_to: str | None = None

    @property
    def image_keys(self) -> list[str]:
        return [image.key for image in self.images]


# --- admin operations: router -> every LM replica (a Serve handle call each) -> its engine --------


class AdminAbort(msgspec.Struct, tag="admin_abort", frozen=True):
    """End these in-flight requests (all of them when None) with finish_reason "abort"."""

    request_ids: list[str] | None = None


class AdminSleep(msgspec.Struct, tag="admin_sleep", frozen=True):
    """Free the KV cache's memory (level 1), and the weights' (level 2), once the requests in flight
    have finished (mode "drain") or been aborted (mode "abort")."""

    level: int = 1
    mode: str = "drain"


class AdminWake(msgspec.Struct, tag="admin_wake", frozen=True):
    pass


class AdminUpdateWeights(msgspec.Struct, tag="admin_update_weights", frozen=True):
    """Serve the LM weights of checkpoint `path` as `version`, after draining or aborting."""

    path: str
    version: int
    mode: str = "drain"


AdminOp = AdminAbort | AdminSleep | AdminWake | AdminUpdateWeights


class AdminCall(msgspec.Struct, tag="admin_call", frozen=True):
    """A handle call meant for one LM replica: the request router sends it to `replica` only."""

    replica: str
    op: AdminOp


class AdminResult(msgspec.Struct, tag="admin_result", frozen=True):
    """How an operation ended on one replica. error_type: INVALID_REQUEST (the client's fault: a
    checkpoint that does not fit) or INTERNAL."""

    replica: str = ""
    ok: bool = True
    error: str | None = None
    error_type: ErrorKind | None = None
    aborted: int = 0  # requests ended by this operation
    sleep_level: int = 0
    weights_version: int = 0
    seconds: float = 0.0


# --- LM replica <-> its engine-core process, over ZMQ (runtime.lm_service.engine_core) ----------


class CoreAdd(msgspec.Struct, tag="core_add", frozen=True):
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    image_hashes: list[str] = []
    reply_to: str | None = None  # GenerateRequest.reply_to


class CoreAbort(msgspec.Struct, tag="core_abort", frozen=True):
    request_id: str


class CoreFail(msgspec.Struct, tag="core_fail", frozen=True):
    request_id: str
    message: str
    error_type: ErrorKind


class CoreWhenMissing(msgspec.Struct, tag="core_when_missing", frozen=True):
    """Answered by CoreMissing(token) once every command sent before it is applied."""

    request_id: str
    image_indexes: list[int]
    token: int


class CoreShutdown(msgspec.Struct, tag="core_shutdown", frozen=True):
    pass


class CoreAdmin(msgspec.Struct, tag="core_admin", frozen=True):
    """Answered by CoreAdminDone(token) once the operation ended."""

    token: int
    op: AdminOp


CoreCommand = CoreAdd | CoreAbort | CoreFail | CoreWhenMissing | CoreShutdown | CoreAdmin


class CoreReady(msgspec.Struct, tag="core_ready", frozen=True):
    """The model is loaded; vision replicas push this core's embeddings to `inbox`."""

    inbox: str
    pid: int


class CoreOutputs(msgspec.Struct, tag="core_outputs", frozen=True):
    """Everything one step produced, for every request at once."""

    outputs: list[RequestOutput]


class CoreNeedEmbeddings(msgspec.Struct, tag="core_need_embeddings", frozen=True):
    request_id: str
    image_indexes: list[int]


class CoreReleased(msgspec.Struct, tag="core_released", frozen=True):
    request_id: str


class CoreMissing(msgspec.Struct, tag="core_missing", frozen=True):
    token: int
    image_indexes: list[int]


class CoreStats(msgspec.Struct, tag="core_stats", frozen=True):
    engine: dict[str, object]  # runtime.lm_service.engine.EngineStats as a dict
    malformed_messages: int = 0


class CoreDead(msgspec.Struct, tag="core_dead", frozen=True):
    message: str


class CoreAdminDone(msgspec.Struct, tag="core_admin_done", frozen=True):
    token: int
    result: AdminResult


CoreEvent = (CoreReady | CoreOutputs | CoreNeedEmbeddings | CoreReleased | CoreMissing | CoreStats | CoreDead
             | CoreAdminDone)
