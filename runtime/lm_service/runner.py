"""Model runner: turns one scheduled step into tensors, runs the LM, returns next-token logits.

It owns every tensor of a step: input embeddings (with image embeddings scattered into their
placeholder rows), the paged batch, and the logits of the sequences that sample this step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.lm_service.kv_cache import PagedBatch, PagedLatentCache, SequenceChunk
from runtime.models.config import ModelConfig
from runtime.models.deepseek_v3 import DeepseekV3LM


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


class ModelRunner:
    def __init__(self, lm: DeepseekV3LM, config: ModelConfig, cache: PagedLatentCache,
                 before_forward: Callable[[int], None] | None = None, batch_decodes: bool = True):
        self.lm, self.config, self.cache = lm, config, cache
        self.device = cache.device
        # Expert parallelism announces each forward (its token count) to the other ranks here.
        self.before_forward = before_forward
        self.batch_decodes = batch_decodes

    @torch.inference_mode()
    def execute(self, inputs: Sequence[StepInput]) -> torch.Tensor:
        """Logits [number of inputs that sample, vocab] in float32, in input order."""
        embeds = self.input_embeddings(inputs)
        chunks = [SequenceChunk(i.block_ids, i.start, len(i.token_ids)) for i in inputs]
        if self.before_forward is not None:
            self.before_forward(embeds.shape[0])
        hidden = self.lm(embeds, PagedBatch(self.cache, chunks, self.batch_decodes))
        ends = torch.tensor(_sample_rows(inputs), dtype=torch.long, device=self.device)
        return self.lm.logits(hidden[ends]).float()

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
