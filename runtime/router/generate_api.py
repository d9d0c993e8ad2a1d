"""SGLang's native `POST /generate`: its body parsed into GenerateRequests, outputs shaped as its answers.

Field names and shapes follow SGLang (sglang/srt/managers/io_struct.py GenerateReqInput,
sglang/srt/sampling/sampling_params.py, and the tokenizer manager's `meta_info`), so a rollout recipe
written against an SGLang server switches engines by base URL:

    {"input_ids": [...] | "text": str (or a list of either), "sampling_params": {...},
     "return_logprob": bool, "top_logprobs_num": int, "return_routed_experts": bool, "stream": bool,
     "rid": str}
    -> {"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": ...}, "prompt_tokens",
        "completion_tokens", "cached_tokens", "output_token_logprobs": [[logprob, id, null], ...],
        "weight_version", "routed_experts": {"shape": [T, L, K], "dtype": "int16", "data": base64}}}

One prompt with n = 1 answers one object; a list of prompts or n > 1 answers a list (each prompt's
n samples together), as SGLang does. A stream sends SSE events whose `text` and `output_ids` are the
whole answer so far (SGLang's default, not deltas), each with an `index` when there are several,
then `data: [DONE]`. Pure functions: the router moves the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import RequestError
from runtime.protocol import RequestOutput, SamplingParams, TokenLogprob
from runtime.requests import RequestLimits, check_fields, parse_count, parse_prompts, parse_sampling
from runtime.requests import parse_flag as _flag

MAX_NEW_TOKENS = 128  # SGLang's default max_new_tokens
# SGLang's sampling names -> the OpenAI-style names runtime.requests.parse_sampling reads.
_RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed",
            "json_schema": "guided_json", "regex": "guided_regex", "ebnf": "guided_grammar"}


@dataclass(frozen=True)
class GenerateBody:
    """A validated /generate body: its prompts (strings to tokenize, or token ids), the sampling
    settings shared by all of them, and how to answer."""

    prompts: list[str | list[int]]
    field: str  # "text" or "input_ids": where the prompts came from (errors name it)
    sampling: SamplingParams
    n: int
    stream: bool
    rid: str | None
    batched: bool  # the prompt was a list of prompts: answer a list even for one
    return_logprob: bool
    top_logprobs_num: int


def parse_generate(body: dict[str, Any], defaults: dict[str, Any], limits: RequestLimits,
                   vocab_size: int) -> GenerateBody:
    check_fields(body, "generate")
    if ("text" in body) == ("input_ids" in body):
        raise RequestError("give exactly one of text or input_ids", "text")
    name = "text" if "text" in body else "input_ids"
    raw = body[name]
    batched = isinstance(raw, list) and bool(raw) and all(isinstance(p, str | list) for p in raw)
    if name == "text" and not (isinstance(raw, str) or (batched and all(isinstance(p, str) for p in raw))):
        raise RequestError("text must be a string or a list of strings", "text")
    if name == "input_ids" and (isinstance(raw, str) or (batched and not all(isinstance(p, list) for p in raw))):
        raise RequestError("input_ids must be a list of token ids or a list of such lists", "input_ids")
    prompts = parse_prompts(raw, vocab_size, name)
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, dict):
        raise RequestError("sampling_params must be an object", "sampling_params")
    check_fields(sp, "generate_sampling", prefix="sampling_params.")
    logprob = _flag(body, "return_logprob")
    top = body.get("top_logprobs_num") or 0
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
        raise RequestError("top_logprobs_num must be an integer in [0, 20]", "top_logprobs_num")
    if body.get("logprob_start_len") not in (None, -1):
        raise RequestError("logprob_start_len is supported only as -1 (output tokens' logprobs only)",
                           "logprob_start_len")
    openai_style: dict[str, Any] = {str(_RENAMED.get(k, k)): v for k, v in sp.items() if k != "n"}
    openai_style.setdefault("max_tokens", MAX_NEW_TOKENS)
    openai_style |= {"logprobs": logprob or top > 0, "top_logprobs": top,
                     "return_routed_experts": _flag(body, "return_routed_experts")}
    try:
        sampling = parse_sampling(openai_style, defaults, limits)
        n = parse_count(sp)
    except RequestError as e:  # name the field as the client wrote it
        field = next((k for k, v in _RENAMED.items() if v == e.field), e.field)
        raise RequestError(f"sampling_params.{field}: {e}", f"sampling_params.{field}") from e
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise RequestError("rid must be a non-empty string", "rid")
    return GenerateBody(prompts, name, sampling, n, _flag(body, "stream"), rid, batched, logprob or top > 0, top)


# --- answers -----------------------------------------------------------------------------------


def finish_reason(out: RequestOutput | None) -> dict[str, Any] | None:
    """SGLang's finish_reason object: None while running, {"type": "stop"|"length"|"abort", ...}."""
    if out is None or not out.finished:
        return None
    if out.finish_reason == "length":
        return {"type": "length", "length": out.completion_tokens}
    if out.finish_reason == "abort":
        return {"type": "abort", "message": "aborted"}
    return {"type": out.finish_reason or "stop"}


def _logprob_triples(logprobs: list[TokenLogprob]) -> list[list[Any]]:
    return [[lp.logprob, lp.token_id, None] for lp in logprobs]


def answer(rid: str, text: str, output_ids: list[int], logprobs: list[TokenLogprob], last: RequestOutput,
           body: GenerateBody, weights_version: int) -> dict[str, Any]:
    """One sample's object: the whole answer so far (a stream event) or at the end."""
    meta: dict[str, Any] = {"id": rid, "finish_reason": finish_reason(last), "prompt_tokens": last.prompt_tokens,
                            "completion_tokens": len(output_ids), "cached_tokens": last.cached_tokens,
                            "weight_version": str(weights_version)}
    if last.routed_experts is not None:  # on the final answer (routing replay)
        meta["routed_experts"] = last.routed_experts.to_json()
    if body.return_logprob:
        meta["output_token_logprobs"] = _logprob_triples(logprobs)
        if body.top_logprobs_num:
            meta["output_top_logprobs"] = [[[p, t, None] for t, p in lp.top] for lp in logprobs]
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta}


def sample_ids(rid: str, prompts: int, n: int) -> list[str]:
    """The id of each sample (each prompt's n together): rid alone for one, else rid-i."""
    total = prompts * n
    return [rid] if total == 1 else [f"{rid}-{i}" for i in range(total)]
