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
        self.data = self._zeros()
        self._bytes_per_token = self.data.numel() * self.data.element_size() // (num_blocks * block_size)

    def _zeros(self) -> torch.Tensor:
        # fp8 is kept as raw bytes: index_copy_/indexing are not implemented for float8 on every device.
        storage = torch.uint8 if self.fp8 else self.dtype
        return torch.zeros(self.cfg.num_hidden_layers, self.num_blocks * self.block_size, self.cfg.latent_dim,
                           dtype=storage, device=self.device)

    @property
    def allocated(self) -> bool:
        return self.data.numel() > 0

    def release(self) -> None:
        """Give the storage back (the engine sleeps): no block may be in use, and none is cached after."""
        self.data = torch.empty(0, dtype=self.data.dtype, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # back to the device, for whoever shares it (a colocated trainer)

    def allocate(self) -> None:
        """Re-create the storage after release (the engine wakes)."""
        if not self.allocated:
            self.data = self._zeros()

    @staticmethod
    def bytes_per_token_limit(cfg: TextConfig, dtype: torch.dtype) -> int:
        """What MLA needs at most: (r + p) values per layer."""
        return cfg.num_hidden_layers * cfg.latent_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        """Measured from the allocation itself (when it was made: a released cache holds none)."""
        return self._bytes_per_token

    def store(self, layer: int, slots: torch.Tensor, latent: torch.Tensor) -> None:
        if self.fp8:
            latent = latent.to(FP8).view(torch.uint8)
        self.data[layer].index_copy_(0, slots, latent.to(self.data.dtype))

    def load(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self._readable(self.data[layer][slots])

    def load_blocks(self, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Whole blocks [*block_ids.shape, block_size, r + p]: one contiguous copy per block, far
        cheaper than gathering slot by slot."""
        blocks = self.data[layer].view(self.num_blocks, self.block_size, -1)
        picked = blocks.index_select(0, block_ids.reshape(-1))
        return self._readable(picked.view(*block_ids.shape, self.block_size, picked.shape[-1]))

    def _readable(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.view(FP8).to(self.dtype) if self.fp8 else stored

    def slot_list(self, block_ids: Sequence[int], start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of a sequence with these blocks."""
        bs = self.block_size
        return [block_ids[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        return torch.tensor(self.slot_list(block_ids, start, end), dtype=torch.long, device=self.device)


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence in one forward: its blocks and the positions [start, start + num_tokens)."""

    block_ids: Sequence[int]
    start: int
    num_tokens: int


class PagedBatch:
    """KVBatch (runtime.models.deepseek_v3) over the paged cache for one forward.

    Sequences with one new token (decodes) are attended together: their block tables are padded
    into one [B, max_blocks] tensor once per forward, and every layer reads whole blocks through it.
    Prefill chunks are attended one by one over their own blocks. All index tensors are built once
    here, from Python lists, and shared by every layer."""

    def __init__(self, cache: PagedLatentCache, chunks: Sequence[SequenceChunk], batch_decodes: bool = True):
        self.cache, self.chunks = cache, list(chunks)
        device = cache.device
        write_slots: list[int] = []
        positions: list[int] = []
        for c in self.chunks:
            write_slots += cache.slot_list(c.block_ids, c.start, c.start + c.num_tokens)
            positions += range(c.start, c.start + c.num_tokens)
        self._write_slots = torch.tensor(write_slots, dtype=torch.long, device=device)
        self._positions = torch.tensor(positions, dtype=torch.long)
        starts = [0]
        for c in self.chunks:
            starts.append(starts[-1] + c.num_tokens)
        decode = [i for i, c in enumerate(self.chunks) if c.num_tokens == 1] if batch_decodes else []
        together = set(decode)
        self._looped = [(i, starts[i], c.num_tokens) for i, c in enumerate(self.chunks) if i not in together]
        self._ctx_blocks = {i: self._blocks_tensor(self.chunks[i], self.chunks[i].start + n)
                            for i, _, n in self._looped}
        self._decode_rows: torch.Tensor | None = None
        if decode:
            self._decode_rows = torch.tensor([starts[i] for i in decode], device=device)
            self._decode_table, self._decode_valid = self._padded_table([self.chunks[i] for i in decode])

    def _blocks_tensor(self, chunk: SequenceChunk, length: int) -> tuple[torch.Tensor, int]:
        used = -(-length // self.cache.block_size)
        return torch.tensor(list(chunk.block_ids[:used]), dtype=torch.long, device=self.cache.device), length

    def _padded_table(self, chunks: list[SequenceChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables [B, max_blocks] (padding repeats a real block; it is masked) and which
        context positions are real [B, max_blocks * block_size]."""
        bs = self.cache.block_size
        lengths = [c.start + 1 for c in chunks]
        widest = -(-max(lengths) // bs)
        rows = []
        for c, n in zip(chunks, lengths, strict=True):
            used = list(c.block_ids[: -(-n // bs)])
            rows.append(used + [used[0]] * (widest - len(used)))
        table = torch.tensor(rows, dtype=torch.long, device=self.cache.device)
        valid = torch.arange(widest * bs)[None, :] < torch.tensor(lengths)[:, None]
        return table, valid.to(self.cache.device)

    def positions(self, device: torch.device | str) -> torch.Tensor:
        return self._positions.to(device)

    def write(self, layer: int, latent: torch.Tensor) -> None:
        self.cache.store(layer, self._write_slots, latent)

    def per_sequence(self) -> list[tuple[int, int, int]]:
        return self._looped

    def context(self, layer: int, seq: int) -> torch.Tensor:
        blocks, length = self._ctx_blocks[seq]
        return self.cache.load_blocks(layer, blocks).reshape(-1, self.cache.data.shape[-1])[:length]

    def decode_rows(self) -> torch.Tensor | None:
        return self._decode_rows

    def decode_context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.cache.load_blocks(layer, self._decode_table)  # [B, max_blocks, block_size, r + p]
        return ctx.view(ctx.shape[0], -1, ctx.shape[-1]), self._decode_valid

    def advance(self) -> None:
        """Progress is the scheduler's to track; nothing to commit here."""
