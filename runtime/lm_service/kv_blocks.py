"""KV block bookkeeping: a pool of fixed-size blocks with refcounts and a prefix cache. No torch.

Lifecycle (the invariant the engine relies on):
- A block is *used* while at least one request holds it (ref_count > 0). Requests hold the blocks
  of their block table from admission until they finish, abort, fail or are preempted.
- A full block whose tokens were all computed is *registered* under its chain hash. Registered blocks
  with no holders stay in the free queue with their contents intact: a later request with the same
  prefix takes them back (a prefix hit) without recomputing.
- Allocation takes blocks from the front of the free queue (least recently freed first) and drops
  their registration at that moment: cached contents are only lost when their space is needed.
- A block hash chains the parent block's hash with the block's token ids and the content hashes of
  every image whose placeholders the block covers, so equal text with a different image never matches.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def block_hash(parent: bytes | None, token_ids: Sequence[int], image_hashes: Sequence[str]) -> bytes:
    """Full-width sha256 over the parent hash, the block's tokens and the images it covers."""
    h = hashlib.sha256(parent or b"root")
    h.update(b"t" + ",".join(map(str, token_ids)).encode())
    h.update(b"i" + "|".join(image_hashes).encode())
    return h.digest()


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # its cached contents are being overwritten now
                if self._cached.get(block.hash) == block_id:
                    del self._cached[block.hash]
                block.hash = None
            block.ref_count = 1
            out.append(block_id)
        return out

    def take_cached(self, hashes: Sequence[bytes]) -> list[int]:
        """Hold the longest run of cached blocks matching `hashes` from the start; return their ids."""
        out = []
        for h in hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            out.append(block_id)
        return out

    def register(self, block_id: int, h: bytes) -> None:
        """Mark a full, computed block as reusable under hash h (first writer wins)."""
        block = self.blocks[block_id]
        if block.hash is None and h not in self._cached:
            block.hash = h
            self._cached[h] = block_id

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. The tail of a sequence is queued first so that it is
        evicted before the shared head (prefixes are likelier to be reused than suffixes)."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} freed more often than held")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None


@dataclass
class BlockTable:
    """One request's blocks, in sequence order, and the chain hashes of its full blocks so far."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    registered: int = 0  # leading blocks already offered to the prefix cache
