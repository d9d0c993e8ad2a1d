"""What tests read of a BlockPool beyond its own API: blocks that are free yet still hold a prefix-cache
entry (a later request with that prefix can take them back)."""

from __future__ import annotations

from runtime.lm_service.kv_blocks import BlockPool


def cached_free(pool: BlockPool) -> int:
    """Free blocks (no request holds them) still registered under a hash."""
    return sum(1 for b in pool.blocks if b.ref_count == 0 and b.hash is not None)
