"""Per-request generation state: sampling generator, stop rules, incremental text, logprobs.

The engine owns one RequestState per live request. It turns each sampled token into a
RequestOutput delta and decides when the request is finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from runtime.lm_service.detokenize import IncrementalDetokenizer
from runtime.lm_service.sampling import choose, new_generator, suppress, token_logprobs
from runtime.lm_service.scheduler import Sequence
from runtime.protocol import ErrorKind, ExpertRouting, RequestOutput, TokenLogprob
from runtime.requests import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """A prompt ready for the LM: ids with image placeholders already expanded (one run of
    placeholder ids per image), and each image's content hash in order (prefix caching keys on it)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    image_hashes: tuple[str, ...] = ()


class RequestState:
    def __init__(self, request: EngineRequest, seq: Sequence, max_tokens: int, eos_ids: tuple[int, ...],
                 tokenizer: Any | None, grammar: Any | None = None):
        self.request, self.seq, self.params = request, seq, request.params
        self.grammar = grammar  # the request's matcher (runtime.lm_service.grammar), fed every token
        # The grammar decides where a constrained answer ends (the router refuses min_tokens with one).
        self.min_tokens = self.params.min_tokens if grammar is None else 0
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(() if self.params.ignore_eos else eos_ids) | frozenset(self.params.stop_token_ids)
        self.generator = new_generator(self.params)
        self.detok = (IncrementalDetokenizer(tokenizer, self.params.skip_special_tokens, self.params.stop)
                      if tokenizer is not None else None)
        # Logprobs of prompt positions 1, 2, ... gathered chunk by chunk; handed out once, with the
        # first output (None once sent, or when not wanted).
        self.prompt_logprobs: list[TokenLogprob] | None = [] if self.params.prompt_logprobs is not None else None
        # Expert ids of positions 0, 1, ... as little-endian int16 rows [MoE layers, k], gathered chunk
        # by chunk and handed out with the last output (None when not wanted).
        self.routing: bytearray | None = bytearray() if self.params.return_routed_experts else None
        self.routing_rows, self.routing_row_shape = 0, (0, 0)

    def prompt_targets(self, start: int, end: int) -> list[int]:
        """The prompt ids that positions [start, end) predict and whose logprobs are still missing."""
        if self.prompt_logprobs is None or start > len(self.prompt_logprobs):
            return []
        last = min(end, self.seq.prompt_len - 1)  # position p predicts token p + 1 of the prompt
        return self.seq.token_ids[start + 1 : last + 1]

    def add_prompt_logprobs(self, start: int, logprobs: list[TokenLogprob]) -> None:
        """Record positions start, start+1, ... (a recompute after preemption repeats known ones)."""
        if self.prompt_logprobs is not None:
            known = len(self.prompt_logprobs)
            self.prompt_logprobs += logprobs[known - start :]

    def add_routing(self, start: int, rows: np.ndarray) -> None:
        """Record positions start, start+1, ... [n, L, k] int16; a recompute after preemption repeats
        known ones, and the first record stands (the routing that produced the tokens)."""
        if self.routing is None:
            return
        assert start <= self.routing_rows, "positions are computed in order"
        new = rows[self.routing_rows - start :]
        self.routing += new.astype("<i2", copy=False).tobytes()
        self.routing_rows += new.shape[0]
        self.routing_row_shape = (rows.shape[1], rows.shape[2])

    def routed_experts(self) -> ExpertRouting | None:
        if self.routing is None:
            return None
        return ExpertRouting((self.routing_rows, *self.routing_row_shape), bytes(self.routing))

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output(self) -> int:
        return self.seq.num_tokens - self.seq.prompt_len

    @property
    def plain_temperature(self) -> float | None:
        """The temperature (0 = greedy) when this step's choice needs nothing of the request's own:
        no seed, no top-k / top-p / min-p, no stop ids banned (then the engine samples it together
        with the other plain rows); None otherwise."""
        p = self.params
        if self.num_output < self.min_tokens and self.stop_ids:
            return None
        if p.greedy:
            return 0.0
        plain = p.seed is None and p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0
        return p.temperature if plain else None

    def sample(self, logits: torch.Tensor) -> int:
        """logits [vocab] float32 -> next token (stop ids are banned until min_tokens is reached)."""
        banned = sorted(self.stop_ids) if self.num_output < self.min_tokens else []
        return choose(suppress(logits, banned), self.params, self.generator)

    def finish_prompt_only(self) -> RequestOutput:
        """max_tokens 0: the prefill ran (for its prompt logprobs) and nothing is generated."""
        return self.output([], "", "length")

    def accept(self, token: int, logits: torch.Tensor | None) -> RequestOutput:
        """Record the sampled token; return this step's delta (finished when a stop rule fired, or
        with an error if the request's grammar rejects the token, which its mask should prevent)."""
        if self.grammar is not None and not self.grammar.consume_token(token):
            return self.output([], "", "error", error=f"structured output: the grammar rejected token {token} "
                               f"({self.grammar.get_error().partition(chr(10))[0]})", error_type=ErrorKind.INTERNAL)
        self.seq.token_ids.append(token)
        logprobs = None
        if self.params.logprobs and logits is not None:
            lp = token_logprobs(logits, token, self.params.top_logprobs)
            logprobs = [TokenLogprob(lp["token_id"], lp["logprob"], lp["top"])]
        reason, text = self._stop_reason_and_text(token)
        return self.output([token], text, reason, logprobs)

    def _stop_reason_and_text(self, token: int) -> tuple[str | None, str]:
        if token in self.stop_ids and self.num_output >= self.min_tokens:
            return "stop", self.detok.finish() if self.detok else ""  # the stop token itself is not shown
        text = self.detok.push([token]) if self.detok else ""
        if self.detok is not None and self.detok.stopped:
            return "stop", text
        if self.grammar is not None and self.grammar.is_stopped():  # the grammar allows nothing more
            return "stop", text + (self.detok.finish() if self.detok else "")
        if self.num_output >= self.max_tokens:
            return "length", text + (self.detok.finish() if self.detok else "")
        return None, text

    def output(self, token_ids: list[int], text: str, reason: str | None,
               logprobs: list[TokenLogprob] | None = None, error: str | None = None,
               error_type: ErrorKind | None = None) -> RequestOutput:
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return RequestOutput(
            request_id=self.request_id,
            token_ids=token_ids,
            text=text,
            finished=reason is not None,
            finish_reason=reason,
            error=error,
            logprobs=logprobs,
            prompt_tokens=self.seq.prompt_len,
            completion_tokens=self.num_output,
            cached_tokens=min(self.seq.prefix_hit_tokens, self.seq.prompt_len),
            error_type=error_type,
            prompt_logprobs=prompt_logprobs if error is None else None,
            routed_experts=self.routed_experts() if reason is not None and error is None else None,
        )
