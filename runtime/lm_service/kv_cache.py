"""The paged MLA latent cache: the tensors behind the block ids the scheduler hands out.

Storage is [layers, num_blocks * block_size, r + p]: per token per layer exactly the latent
(normalised compressed KV + the shared roped key), nothing per head. Token t of a sequence lives
in slot block_ids[t // block_size] * block_size + t % block_size. Optional FP8 (e4m3) storage
halves or quarters the bytes; values are cast back to the compute dtype when read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.models.config import TextConfig

FP8 = torch.float8_e4m3fn


class PagedLatentCache:
    def __init__(self, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", fp8: bool = False):
        self.cfg, self.num_blocks, self.block_size = cfg, num_blocks, block_size
        self.dtype, self.device, self.fp8 = dtype, torch.device(device), fp8
        # fp8 is kept as raw bytes: index_copy_/indexing are not implemented for float8 on every device.
        storage = torch.uint8 if fp8 else dtype
        self.data = torch.zeros(cfg.num_hidden_layers, num_blocks * block_size, cfg.latent_dim,
                                dtype=storage, device=device)

    @staticmethod
    def bytes_per_token_limit(cfg: TextConfig, dtype: torch.dtype) -> int:
        """What MLA needs at most: (r + p) values per layer."""
        return cfg.num_hidden_layers * cfg.latent_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Measured from the allocation itself."""
        return self.data.numel() * self.data.element_size() // (self.num_blocks * self.block_size)

    def store(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        if self.fp8:
            latent = latent.to(FP8).view(torch.uint8)
        self.data[layer].index_copy_(0, slots, latent.to(self.data.dtype))

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        out = self.data[layer][slots]
        return out.view(FP8).to(self.dtype) if self.fp8 else out

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Cache slots of positions [start, end) of a sequence with these blocks."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(block_ids, dtype=torch.long)
        return (blocks[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.device)


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence in one forward: its blocks and the positions [start, start + num_tokens)."""

    block_ids: Sequence[int]
    start: int
    num_tokens: int


class PagedBatch:
    """KVBatch (runtime.models.deepseek_v3) over the paged cache for one forward.
    Sequences with one new token (decodes) are attended together; prefill chunks one by one."""

    def __init__(self, cache: PagedLatentCache, chunks: Sequence[SequenceChunk], batch_decodes: bool = True):
        self.cache, self.chunks = cache, list(chunks)
        self._write_slots = torch.cat([cache.slots(c.block_ids, c.start, c.start + c.num_tokens) for c in chunks])
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + c.num_tokens)
        decode = [i for i, c in enumerate(chunks) if c.num_tokens == 1] if batch_decodes else []
        together = set(decode)
        self._looped = [(i, starts[i], c.num_tokens) for i, c in enumerate(chunks) if i not in together]
        self._ctx_slots = {
            i: cache.slots(chunks[i].block_ids, 0, chunks[i].start + n) for i, _, n in self._looped
        }
        self._decode_rows: torch.Tensor | None = None
        if decode:
            self._decode_rows = torch.tensor([starts[i] for i in decode], device=cache.device)
            self._decode_slots, self._decode_valid = self._padded_slots([chunks[i] for i in decode])

    def _padded_slots(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([c.start + 1 for c in chunks])
        longest = int(lengths.max())
        slots = torch.zeros(len(chunks), longest, dtype=torch.long, device=self.cache.device)
        for b, c in enumerate(chunks):
            slots[b, : c.start + 1] = self.cache.slots(c.block_ids, 0, c.start + 1)
        valid = torch.arange(longest)[None, :] < lengths[:, None]
        return slots, valid.to(self.cache.device)

    def positions(self, device: torch.device | str) -> torch.Tensor:
        return torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in self.chunks]).to(device)

    def write(self, layer: int, latent: torch.Tensor) -> None:
        self.cache.store(layer, self._write_slots, latent)

    def per_sequence(self) -> list[tuple[int, int, int]]:
        return self._looped

    def context(self, layer: int, seq: int) -> torch.Tensor:
        return self.cache.load(layer, self._ctx_slots[seq])

    def decode_rows(self) -> torch.Tensor | None:
        return self._decode_rows

    def decode_context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.load(layer, self._decode_slots), self._decode_valid

    def advance(self) -> None:
        """Progress is the scheduler's to track; nothing to commit here."""
