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
        self._scratch = torch.empty(0, dtype=self.data.dtype, device=self.device)
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
        self._scratch = torch.empty(0, dtype=self.data.dtype, device=self.device)
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

    @property
    def block_bytes(self) -> int:
        """One block of one layer, as read (in the compute dtype)."""
        return self.block_size * self.cfg.latent_dim * torch.empty((), dtype=self.dtype).element_size()

    def load_blocks(self, layer: int, block_ids: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Whole blocks [*block_ids.shape, block_size, r + p]: one contiguous copy per block, far
        cheaper than gathering slot by slot. With scratch, into this cache's reusable buffer: the
        result is valid until the next scratch read (a fresh multi-MB tensor per layer costs page
        faults; a reused one stays in the CPU's cache)."""
        blocks = self.data[layer].view(self.num_blocks, self.block_size, -1)
        flat = block_ids.reshape(-1)
        out = self._scratch_for(flat.numel(), blocks.shape[1:]) if scratch else None
        picked = torch.index_select(blocks, 0, flat, out=out) if out is not None else blocks.index_select(0, flat)
        return self._readable(picked.view(*block_ids.shape, self.block_size, picked.shape[-1]))

    def _scratch_for(self, num_blocks: int, block_shape: torch.Size) -> torch.Tensor:
        need = num_blocks * block_shape.numel()
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=self.data.dtype, device=self.device)
        return self._scratch[:need].view(num_blocks, *block_shape)

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


# A decode group's padded context is gathered and attended while it is still in the CPU's cache:
# at 64 sequences of ~190 tokens one layer's padded latents are ~28 MB (float32), and gathering them
# all before attending sent every byte to memory and back three times (copy, scores, values).
DECODE_GROUP_BYTES = 4 << 20


class PagedBatch:
    """KVBatch (runtime.models.deepseek_v3) over the paged cache for one forward.

    Sequences with one new token (decodes) are attended together, in groups of similar length
    whose padded context fits DECODE_GROUP_BYTES: each group's block table is padded once per
    forward, and every layer gathers whole blocks through it into one scratch buffer. Prefill
    chunks are attended one by one over their own blocks. All index tensors are built once here,
    from Python lists, and shared by every layer."""

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
        self._groups: list[tuple[slice, torch.Tensor, torch.Tensor]] = []
        if decode:
            decode.sort(key=lambda i: self.chunks[i].start)  # similar lengths share a group: less padding
            self._decode_rows = torch.tensor([starts[i] for i in decode], device=device)
            self._groups = self._decode_groups([self.chunks[i] for i in decode])

    def _blocks_tensor(self, chunk: SequenceChunk, length: int) -> tuple[torch.Tensor, int]:
        used = -(-length // self.cache.block_size)
        return torch.tensor(list(chunk.block_ids[:used]), dtype=torch.long, device=self.cache.device), length

    def _decode_groups(self, chunks: list[SequenceChunk]) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
        """Consecutive runs of the decodes (sorted by length, so the last of a run is its widest),
        each within DECODE_GROUP_BYTES of padded context unless it is one sequence alone:
        (its positions among the decodes, padded block table, valid)."""
        bs, per_block = self.cache.block_size, self.cache.block_bytes
        groups, first = [], 0
        for i in range(1, len(chunks) + 1):
            if i < len(chunks) and (i + 1 - first) * -(-(chunks[i].start + 1) // bs) * per_block <= DECODE_GROUP_BYTES:
                continue  # chunks[i] joins the run
            groups.append((slice(first, i), *self._padded_table(chunks[first:i])))
            first = i
        return groups

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

    def decode_groups(self) -> list[slice]:
        return [rows for rows, _, _ in self._groups]

    def decode_context(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, table, valid = self._groups[group]
        ctx = self.cache.load_blocks(layer, table, scratch=True)  # [n, max_blocks, block_size, r + p]
        return ctx.view(ctx.shape[0], -1, ctx.shape[-1]), valid

    def advance(self) -> None:
        """Progress is the scheduler's to track; nothing to commit here."""
