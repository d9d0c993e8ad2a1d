"""A KVBatch over contiguous per-sequence buffers: the simplest cache the model can run on, so tests
check the model (and the engine's paged cache) against it. Not used by the runtime."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.models.config import TextConfig


class ContiguousLatentKV:
    """One sequence, one preallocated buffer [layers, max_len, r + p]."""

    def __init__(self, cfg: TextConfig, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buffer = torch.zeros(cfg.num_hidden_layers, max_len, cfg.latent_dim, dtype=dtype, device=device)
        self.length = 0  # tokens committed before the current forward

    def write(self, layer: int, latent: torch.Tensor) -> None:
        end = self.length + latent.shape[0]
        if end > self.buffer.shape[1]:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.buffer.shape[1]}")
        self.buffer[layer, self.length : end] = latent

    def read(self, layer: int, new: int) -> torch.Tensor:
        return self.buffer[layer, : self.length + new]


@dataclass
class SequenceBatch:
    """KVBatch over contiguous per-sequence buffers (one sequence at a time):
    rows [start, start+len) belong to kvs[i]; every sequence is attended on its own."""

    lengths: Sequence[int]
    kvs: Sequence[ContiguousLatentKV]

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        parts = [torch.arange(kv.length, kv.length + n) for n, kv in zip(self.lengths, self.kvs, strict=True)]
        return torch.cat(parts).to(device)

    def write(self, layer: int, latent: torch.Tensor) -> None:
        for (_, start, n), kv in zip(self.per_sequence(), self.kvs, strict=True):
            kv.write(layer, latent[start : start + n])

    def per_sequence(self) -> list[tuple[int, int, int]]:
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        return [(i, starts[i], n) for i, n in enumerate(self.lengths)]

    def context(self, layer: int, seq: int) -> torch.Tensor:
        return self.kvs[seq].read(layer, self.lengths[seq])

    def decode_rows(self) -> torch.Tensor | None:
        return None

    def decode_groups(self) -> list[slice]:
        return []

    def decode_context(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("SequenceBatch attends every sequence on its own")

    def advance(self) -> None:
        for n, kv in zip(self.lengths, self.kvs, strict=True):
            kv.length += n
