"""Embedding cache bookkeeping: references per request, LRU under a budget, dedupe, leases."""

from __future__ import annotations

import asyncio
import random

import pytest

from runtime.cache.embedding_cache import EmbeddingCache, EmbeddingTooLargeError, embedding_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _counting_compute(calls: list[str], key: str, delay: float = 0.0):
    async def compute() -> str:
        calls.append(key)
        await asyncio.sleep(delay)
        return f"value-{key}"
    return compute


def test_key_changes_with_everything_that_changes_the_embeddings() -> None:
    base = embedding_key(b"img", "proc", "model", "float32")
    assert len(base) == 64  # full sha256
    assert base == embedding_key(b"img", "proc", "model", "float32")
    others = [embedding_key(b"img2", "proc", "model", "float32"), embedding_key(b"img", "proc2", "model", "float32"),
              embedding_key(b"img", "proc", "model2", "float32"), embedding_key(b"img", "proc", "model", "bfloat16"),
              embedding_key(b"", "procimg", "model", "float32")]
    assert base not in others and len(set(others)) == len(others)


def test_hit_does_not_compute_again_and_release_drops_references() -> None:
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=100)
    calls: list[str] = []

    async def main() -> None:
        assert await cache.get_or_compute("r1", "a", 10, _counting_compute(calls, "a")) == "value-a"
        assert await cache.get_or_compute("r2", "a", 10, _counting_compute(calls, "a")) == "value-a"
        assert calls == ["a"] and cache.stats().live_references == 2
        assert cache.release("r1") == 1 and cache.stats().live_references == 1
        cache.release("r2")
        assert cache.stats().live_references == 0 and cache.stats().entries == 1  # kept for later hits

    asyncio.run(main())
    assert (cache.stats().hits, cache.stats().misses) == (1, 1)


def test_concurrent_requests_for_one_new_image_encode_once() -> None:
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=100)
    calls: list[str] = []

    async def main() -> list[str]:
        return await asyncio.gather(*(cache.get_or_compute(f"r{i}", "k", 10, _counting_compute(calls, "k", 0.01))
                                      for i in range(5)))

    assert asyncio.run(main()) == ["value-k"] * 5
    assert calls == ["k"] and cache.stats().live_references == 5 and cache.stats().in_flight == 0


def test_failed_compute_reaches_every_waiter_and_caches_nothing() -> None:
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=100)

    async def boom() -> str:
        await asyncio.sleep(0.01)
        raise ValueError("not an image")

    async def main() -> list:
        return await asyncio.gather(*(cache.get_or_compute(f"r{i}", "k", 10, boom) for i in range(3)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results)
    assert cache.stats().entries == 0 and cache.stats().in_flight == 0 and cache.stats().live_references == 0


def test_lru_eviction_spares_referenced_entries_and_never_exceeds_the_budget() -> None:
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=30)
    calls: list[str] = []

    async def main() -> None:
        for key in "abc":
            await cache.get_or_compute(f"r-{key}", key, 10, _counting_compute(calls, key))
        cache.release("r-a")
        cache.release("r-b")
        await cache.get_or_compute("r-x", "b", 10, _counting_compute(calls, "b"))  # b is used again: now newest
        cache.release("r-x")
        await cache.get_or_compute("r-d", "d", 10, _counting_compute(calls, "d"))  # evicts a (oldest unused)
        assert cache.stats().evictions == 1 and cache.stats().bytes == 30
        await cache.get_or_compute("r-a2", "a", 10, _counting_compute(calls, "a"))  # a recomputed, b evicted
        assert calls == ["a", "b", "c", "d", "a"]
        # c, d and a are all referenced now: a new entry cannot be cached, but is still returned.
        assert await cache.get_or_compute("r-e", "e", 10, _counting_compute(calls, "e")) == "value-e"
        assert cache.stats().bypasses == 1 and cache.stats().bytes == 30

    asyncio.run(main())


def test_an_entry_larger_than_the_budget_is_refused_before_any_work() -> None:
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=30)
    calls: list[str] = []
    with pytest.raises(EmbeddingTooLargeError, match="budget"):
        asyncio.run(cache.get_or_compute("r", "big", 31, _counting_compute(calls, "big")))
    assert calls == []


def test_a_lost_release_is_reclaimed_by_the_lease() -> None:
    clock = Clock()
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=10, lease_s=60, clock=clock)
    calls: list[str] = []
    asyncio.run(cache.get_or_compute("crashed", "a", 10, _counting_compute(calls, "a")))
    clock.now = 59
    assert cache.reclaim_expired() == 0 and cache.stats().live_references == 1
    clock.now = 61
    assert cache.reclaim_expired() == 1 and cache.stats().live_references == 0
    asyncio.run(cache.get_or_compute("next", "b", 10, _counting_compute(calls, "b")))  # a is evictable now
    assert calls == ["a", "b"] and cache.stats().expired_leases == 1
    assert cache.release("crashed") == 0


def test_random_workload_drains_to_zero_references_within_budget() -> None:
    rng = random.Random(0)
    cache: EmbeddingCache[str] = EmbeddingCache(budget_bytes=200)
    peak = 0

    async def request(i: int) -> None:
        nonlocal peak
        keys = [f"img{rng.randint(0, 20)}" for _ in range(rng.randint(1, 3))]
        try:
            for key in keys:
                if rng.random() < 0.1:
                    await cache.get_or_compute(f"r{i}", key, 10, _failing)
                await cache.get_or_compute(f"r{i}", key, rng.choice([10, 30, 50]), _counting_compute([], key, 0.001))
                peak = max(peak, cache.stats().bytes)
        except ValueError:
            pass
        finally:
            cache.release(f"r{i}")

    async def main() -> None:
        await asyncio.gather(*(request(i) for i in range(200)))

    asyncio.run(main())
    stats = cache.stats()
    assert stats.live_references == 0 and stats.in_flight == 0 and peak <= 200 and stats.bytes <= 200
    assert stats.hits > 0 and stats.evictions > 0


async def _failing() -> str:
    raise ValueError("bad image")
