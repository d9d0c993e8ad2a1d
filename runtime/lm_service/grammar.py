"""Structured output in the engine: compiled grammars, one matcher per constrained request, and the
batched token mask of a step (llguidance; bench/README.md says why it and not xgrammar).

Lifecycle (GrammarBook): the engine opens a request's matcher when it adds a request whose sampling
params carry a StructuredOutput, and closes it when that request ends for any reason (finished,
aborted, failed). `live` holds exactly the open matchers, so a step in which no constrained request
is live does no grammar work at all. The request's RequestState holds the same matcher and feeds it
each sampled token. Compiled grammars are kept by spec (least recently used dropped past
`cache_size`) as template matchers that each new request copies. The tokenizer view llguidance
needs is built once, with the engine (about a second for a 131k vocabulary, bench/README.md), so
that no constrained request stalls the step loop for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

from runtime.errors import RequestError
from runtime.lm_service.sampling import apply_token_bitmask
from runtime.protocol import StructuredOutput
from runtime.structured import grammar_text

if TYPE_CHECKING:
    from runtime.lm_service.request_state import RequestState

log = logging.getLogger(__name__)


class GrammarBook:
    def __init__(self, tokenizer: Any | None, vocab_size: int, eos_token_ids: tuple[int, ...],
                 cache_size: int = 64, threads: int = 1):
        self.vocab_size, self.eos_token_ids, self.cache_size = vocab_size, eos_token_ids, cache_size
        self.live: dict[str, llguidance.LLMatcher] = {}
        self._tokenizer, self._unavailable = self._build_tokenizer(tokenizer)
        self._templates: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor(num_threads=threads)
        self._words = (vocab_size + 31) // 32

    def open(self, request_id: str, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher for the request (RequestError if the spec does not compile)."""
        matcher = self._template(spec).deep_copy()
        self.live[request_id] = matcher
        return matcher

    def close(self, request_id: str) -> None:
        self.live.pop(request_id, None)

    def mask(self, states: list[RequestState], logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Ban, in logits [B, V] (row i samples for states[i]), every token the row's grammar does not
        allow next: all constrained rows' masks are filled in one call and applied in one. Returns
        the raw rows of constrained requests that want logprobs (those report the model's own
        distribution). A row whose matcher is in an error state, or allows nothing, is left
        unmasked: its request then fails when the matcher rejects the sampled token."""
        rows = [i for i, s in enumerate(states) if s.request_id in self.live]
        if not rows:
            return {}
        bitmask = torch.empty((len(rows), self._words), dtype=torch.int32)
        matchers = [(self.live[states[i].request_id], k) for k, i in enumerate(rows)]
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), self._words * 4, len(rows))
        nonempty = bitmask.ne(0).any(dim=1).tolist()  # an all-banned row would make the sampler fail
        usable = [k for k, (m, _) in enumerate(matchers) if nonempty[k] and not m.is_error()]
        raw = {i: logits[i].clone() for i in rows if states[i].params.logprobs}
        if usable:
            apply_token_bitmask(logits, bitmask[usable], [rows[k] for k in usable])
        return raw

    def _template(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        template = self._templates.get(spec) or self._compile(spec)
        self._templates[spec] = template
        self._templates.move_to_end(spec)
        while len(self._templates) > self.cache_size:
            self._templates.popitem(last=False)
        return template

    def _compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise RequestError(self._unavailable)
        try:
            template = llguidance.LLMatcher(tokenizer, grammar_text(spec), log_level=0)
            error = template.get_error() if template.is_error() else None
        except Exception as e:  # the client's grammar, not our fault: the client is told what is wrong with it
            log.debug("structured output (%s) does not compile", spec.kind, exc_info=True)
            error = f"{type(e).__name__}: {e}"
        if error is not None:
            raise RequestError(f"structured output ({spec.kind}) does not compile: {error}")
        return template

    def _build_tokenizer(self, tokenizer: Any | None) -> tuple[llguidance.LLTokenizer | None, str]:
        """llguidance's view of the tokenizer, or None and why structured output is unavailable."""
        if tokenizer is None:
            return None, "structured output needs the engine's tokenizer, and this engine has none"
        try:
            return llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                eos_token=list(self.eos_token_ids) or None), ""
        except Exception:  # a tokenizer llguidance cannot read: serve, but without structured output
            log.warning("structured output is unavailable: llguidance cannot use the tokenizer", exc_info=True)
            return None, "structured output is unavailable on this engine: llguidance cannot use its tokenizer"
