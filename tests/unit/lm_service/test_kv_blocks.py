"""The KV block pool: refcounted allocation, an LRU free queue and a prefix cache of chained hashes."""

from __future__ import annotations

import pytest

from runtime.lm_service.kv_blocks import BlockPool, block_hash
from tests.unit.lm_service.pool_view import cached_free


def _chain(*blocks: list[int]) -> list[bytes]:
    """Chain hashes of consecutive text-only blocks."""
    out: list[bytes] = []
    for tokens in blocks:
        out.append(block_hash(out[-1] if out else None, tokens, []))
    return out


def _free_order(pool: BlockPool) -> list[int]:
    """The order in which allocate() would hand out the currently free blocks (drains the pool)."""
    return pool.allocate(pool.num_free)


def test_rejects_an_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_and_free_keep_the_counts() -> None:
    pool = BlockPool(6)
    assert (pool.num_free, pool.num_used) == (6, 0)
    a = pool.allocate(2)
    b = pool.allocate(3)
    assert len(a) == 2 and len(b) == 3 and len(set(a) | set(b)) == 5
    assert (pool.num_free, pool.num_used) == (1, 5)
    assert all(pool.blocks[i].ref_count == 1 for i in a + b)
    assert pool.allocate(0) == []
    pool.free(a)
    assert (pool.num_free, pool.num_used) == (3, 3)
    assert all(pool.blocks[i].ref_count == 0 for i in a)
    pool.free(b)
    assert (pool.num_free, pool.num_used) == (6, 0)
    assert (len(pool.blocks), pool.num_used, cached_free(pool)) == (6, 0, 0)


def test_allocate_raises_when_not_enough_blocks_are_free() -> None:
    pool = BlockPool(4)
    held = pool.allocate(3)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    # A failed allocation takes nothing.
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert len(pool.allocate(1)) == 1
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free(held)
    assert pool.num_free == 3


def test_double_free_raises() -> None:
    pool = BlockPool(3)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(RuntimeError):
        pool.free(ids[:1])
    with pytest.raises(RuntimeError):
        pool.free([2])  # never allocated
    assert (pool.num_free, pool.num_used) == (3, 0)


def test_take_cached_holds_the_longest_matching_prefix_and_stops_at_the_first_miss() -> None:
    pool = BlockPool(8)
    hashes = _chain([1, 2], [3, 4], [5, 6], [7, 8])
    ids = pool.allocate(4)
    # Register blocks 0, 1 and 3 of the chain but not block 2: a hole.
    for idx in (0, 1, 3):
        pool.register(ids[idx], hashes[idx])

    assert pool.take_cached(hashes) == ids[:2]  # stops at the hole, never reaches block 3
    assert [pool.blocks[i].ref_count for i in ids] == [2, 2, 1, 1]

    other = _chain([1, 2], [9, 9], [5, 6])
    assert pool.take_cached(other) == ids[:1]  # the second block differs: only the first matches
    assert pool.take_cached(_chain([0, 0])) == []  # miss on the first block
    assert pool.take_cached([]) == []
    assert pool.take_cached(hashes[3:]) == [ids[3]]  # the lookup is by hash only: a suffix alone matches
    assert [pool.blocks[i].ref_count for i in ids] == [3, 2, 1, 2]


def test_a_freed_registered_block_stays_takeable_until_allocation_reuses_it() -> None:
    pool = BlockPool(4)
    hashes = _chain([1, 2], [3, 4])
    owner = pool.allocate(2)
    for block_id, h in zip(owner, hashes, strict=True):
        pool.register(block_id, h)
    pool.free(owner)  # the owner finished
    assert (pool.num_used, cached_free(pool)) == (0, 2)

    # A later request with the same prefix takes the blocks back out of the free queue.
    taken = pool.take_cached(hashes)
    assert taken == owner
    assert (pool.num_free, pool.num_used) == (2, 2)
    assert all(pool.blocks[i].ref_count == 1 for i in taken)
    pool.free(taken)
    assert pool.num_free == 4

    # Allocation that reuses the blocks drops their registration: no stale hit afterwards.
    pool.allocate(4)
    assert all(b.hash is None for b in pool.blocks)
    assert pool.take_cached(hashes) == []
    assert cached_free(pool) == 0


def test_allocation_reuses_the_least_recently_freed_block_first() -> None:
    pool = BlockPool(4)
    a, b, c, d = pool.allocate(4)
    hashes = _chain([1], [2], [3], [4])
    for block_id, h in zip((a, b, c, d), hashes, strict=True):
        pool.register(block_id, h)
    # Free in the order c, a, d, b (one block per call).
    for block_id in (c, a, d, b):
        pool.free([block_id])

    assert pool.allocate(1) == [c]  # least recently freed goes first and loses its registration
    assert pool.take_cached(hashes[2:3]) == []
    assert pool.take_cached(hashes[0:1]) == [a]  # the others are still cached
    assert pool.take_cached(hashes[3:4]) == [d]
    assert pool.take_cached(hashes[1:2]) == [b]
    pool.free([a])
    pool.free([b])
    pool.free([d])
    assert _free_order(pool) == [a, b, d]


def test_take_cached_then_free_moves_a_block_to_the_back_of_the_queue() -> None:
    pool = BlockPool(3)
    ids = pool.allocate(3)
    h = _chain([7])[0]
    pool.register(ids[0], h)
    pool.free(ids)  # queue: ids[2], ids[1], ids[0]
    assert pool.take_cached([h]) == [ids[0]]
    assert pool.num_free == 2
    pool.free([ids[0]])  # recently used again: evicted last
    assert _free_order(pool) == [ids[2], ids[1], ids[0]]


def test_free_queues_the_tail_of_a_block_list_before_its_head() -> None:
    pool = BlockPool(6)
    first = pool.allocate(3)
    second = pool.allocate(3)
    pool.free(first)
    pool.free(second)
    assert _free_order(pool) == first[::-1] + second[::-1]

    # With registrations: evicting one block for a new request keeps the shared head cached.
    pool = BlockPool(3)
    ids = pool.allocate(3)
    hashes = _chain([1, 1], [2, 2], [3, 3])
    for block_id, h in zip(ids, hashes, strict=True):
        pool.register(block_id, h)
    pool.free(ids)
    assert pool.allocate(1) == [ids[2]]
    assert pool.take_cached(hashes) == ids[:2]


def test_a_block_held_twice_is_used_until_both_holders_free_it() -> None:
    pool = BlockPool(2)
    (block_id,) = pool.allocate(1)
    h = _chain([5])[0]
    pool.register(block_id, h)
    assert pool.take_cached([h]) == [block_id]
    pool.free([block_id])
    assert (pool.num_used, pool.blocks[block_id].ref_count) == (1, 1)
    pool.free([block_id])
    assert (pool.num_used, pool.blocks[block_id].ref_count) == (0, 0)
    with pytest.raises(RuntimeError):
        pool.free([block_id])


def test_register_is_first_writer_wins() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(2)
    h = _chain([1, 2, 3])[0]
    pool.register(first, h)
    pool.register(second, h)  # the same contents computed again by another request
    assert pool.blocks[first].hash == h
    assert pool.blocks[second].hash is None
    assert pool.take_cached([h]) == [first]

    # A registered block keeps its first hash.
    other = _chain([9])[0]
    pool.register(first, other)
    assert pool.blocks[first].hash == h
    assert pool.take_cached([other]) == []

    # Freeing and reallocating the duplicate does not disturb the first block's entry.
    pool.free([second])
    pool.allocate(3)  # reuses `second` and the two never-used blocks
    assert pool.take_cached([h]) == [first]


def test_block_hash_depends_on_parent_tokens_and_images() -> None:
    base = block_hash(None, [1, 2, 3, 4], ["img-a"])
    assert base == block_hash(None, [1, 2, 3, 4], ["img-a"])
    assert base == block_hash(None, (1, 2, 3, 4), ("img-a",))
    assert len(base) == 32

    parent = block_hash(None, [9], [])
    variants = [
        block_hash(parent, [1, 2, 3, 4], ["img-a"]),  # different parent
        block_hash(None, [1, 2, 3, 5], ["img-a"]),  # different tokens
        block_hash(None, [1, 2, 3], ["img-a"]),  # fewer tokens
        block_hash(None, [12, 3, 4], ["img-a"]),  # same digits, different split
        block_hash(None, [1, 2, 3, 4], ["img-b"]),  # different image
        block_hash(None, [1, 2, 3, 4], []),  # no image
        block_hash(None, [1, 2, 3, 4], ["img-a", "img-a"]),  # two images
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert block_hash(parent, [1], []) == block_hash(parent, [1], [])
    assert block_hash(parent, [1], []) != block_hash(block_hash(None, [8], []), [1], [])
