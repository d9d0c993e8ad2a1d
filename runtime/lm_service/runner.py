"""Model runner: turns one scheduled step into tensors, runs the LM, returns next-token logits.

It owns every tensor of a step: input embeddings (with image embeddings scattered into their
placeholder rows), the paged batch, and the logits of the sequences that sample this step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from runtime.lm_service.kv_cache import PagedBatch, PagedLatentCache, SequenceChunk
from runtime.models.config import ModelConfig
from runtime.models.deepseek_v3 import DeepseekV3LM
from runtime.protocol import TokenLogprob

_LOGPROB_ROWS = 256  # prompt rows turned into [rows, vocab] logits at a time


@dataclass
class ImageRows:
    """Embeddings [tokens, hidden] of one image whose placeholders start at position `start`."""

    start: int
    embeddings: torch.Tensor


@dataclass
class StepInput:
    token_ids: Sequence[int]  # the ids of positions [start, start + len) of this chunk
    block_ids: Sequence[int]
    start: int
    samples: bool
    images: list[ImageRows] = field(default_factory=list)  # images overlapping this chunk
    # Prompt logprobs: the ids that positions start, start+1, ... predict (a prefix of the chunk's
    # rows), and how many alternatives to report for each.
    logprob_targets: Sequence[int] = ()
    logprob_top: int = 0
    records_routing: bool = False  # return the experts each of the chunk's rows was routed to


@dataclass
class StepLogits:
    sampled: torch.Tensor  # [inputs that sample, vocab] float32, in input order
    prompt: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # input index -> its targets' logprobs
    # input index -> expert ids of its rows [rows, MoE layers, k] int16 (inputs that record routing)
    routing: dict[int, np.ndarray] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, lm: DeepseekV3LM, config: ModelConfig, cache: PagedLatentCache,
                 before_forward: Callable[[int], None] | None = None, batch_decodes: bool = True):
        self.lm, self.config, self.cache = lm, config, cache
        self.device = cache.device
        # Expert parallelism announces each forward (its token count) to the other ranks here.
        self.before_forward = before_forward
        self.batch_decodes = batch_decodes

    @torch.inference_mode()
    def execute(self, inputs: Sequence[StepInput]) -> StepLogits:
        """The sampling rows' logits, and the prompt logprobs the inputs asked for."""
        embeds = self.input_embeddings(inputs)
        chunks = [SequenceChunk(i.block_ids, i.start, len(i.token_ids)) for i in inputs]
        if self.before_forward is not None:
            self.before_forward(embeds.shape[0])
        routed: list[torch.Tensor] | None = [] if any(i.records_routing for i in inputs) else None
        hidden = self.lm(embeds, PagedBatch(self.cache, chunks, self.batch_decodes), routed=routed)
        ends = torch.tensor(_sample_rows(inputs), dtype=torch.long, device=self.device)
        step = StepLogits(self.lm.logits(hidden[ends]).float())
        routing = None if routed is None else self._routing_matrix(routed, embeds.shape[0])
        row = 0
        for index, item in enumerate(inputs):
            if item.logprob_targets:
                rows = hidden[row : row + len(item.logprob_targets)]
                step.prompt[index] = self.token_logprobs(rows, item.logprob_targets, item.logprob_top)
            if routing is not None and item.records_routing:
                step.routing[index] = routing[row : row + len(item.token_ids)]
            row += len(item.token_ids)
        return step

    def _routing_matrix(self, routed: list[torch.Tensor], rows: int) -> np.ndarray:
        """Each MoE layer's expert ids [T, k], in layer order -> [T, L, k] int16 in host memory (one
        copy per step; slicing it per input is then nearly free)."""
        if not routed:  # a model without MoE layers
            return np.empty((rows, 0, self.config.text.num_experts_per_tok), dtype=np.int16)
        return torch.stack(routed, dim=1).to(torch.int16).cpu().numpy()

    def token_logprobs(self, hidden: torch.Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
        """Logprob of targets[i] under row i's distribution, and the top alternatives. hidden [n, H];
        logits are made a slice of rows at a time so a long prompt never holds [n, vocab] at once."""
        out: list[TokenLogprob] = []
        wanted = torch.tensor(list(targets), dtype=torch.long, device=self.device)
        for lo in range(0, hidden.shape[0], _LOGPROB_ROWS):
            logp = torch.log_softmax(self.lm.logits(hidden[lo : lo + _LOGPROB_ROWS]).float(), dim=-1)
            chosen = logp.gather(1, wanted[lo : lo + _LOGPROB_ROWS, None]).squeeze(1).tolist()
            best = torch.topk(logp, top) if top else None
            for i, lp in enumerate(chosen):
                alts = [] if best is None else list(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True))
                out.append(TokenLogprob(int(wanted[lo + i]), lp, alts))
        return out

    def input_embeddings(self, inputs: Sequence[StepInput]) -> torch.Tensor:
        """[T, hidden]. Placeholder ids (image and video) embed as token 0, as in the reference model,
        then each image's rows overwrite the positions its placeholders hold in this chunk."""
        ids = torch.tensor([t for i in inputs for t in i.token_ids], device=self.device)
        placeholder = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
        embeds = self.lm.embed(ids.masked_fill(placeholder, 0))
        row = 0
        for item in inputs:
            end = item.start + len(item.token_ids)
            for image in item.images:
                lo, hi = max(item.start, image.start), min(end, image.start + image.embeddings.shape[0])
                if lo < hi:
                    rows = slice(row + lo - item.start, row + hi - item.start)
                    embeds[rows] = image.embeddings[lo - image.start : hi - image.start].to(embeds.dtype)
            row += len(item.token_ids)
        return embeds


def _sample_rows(inputs: Sequence[StepInput]) -> list[int]:
    rows, row = [], 0
    for item in inputs:
        row += len(item.token_ids)
        if item.samples:
            rows.append(row - 1)
    return rows
