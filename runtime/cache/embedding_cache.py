"""The vision pool's embedding cache: content-addressed, referenced per request, bounded in bytes.

Lifecycle (the invariant every path keeps):
- A key is the full-width digest of an image's bytes plus everything that changes its embeddings
  (processor config, model identity, dtype): see `embedding_key`.
- `get_or_compute(request_id, key, nbytes, compute)` returns the entry's value and records a
  reference (request_id -> key). Concurrent calls for a key being computed wait for that one
  computation; it runs once.
- `release(request_id)` drops every reference the request holds. An entry with no references stays
  cached, least recently used first in line for eviction, until its bytes are needed.
- Eviction only ever touches entries with no references. If the budget cannot be met without
  evicting a referenced entry, the new value is returned to its caller but not cached (counted as a
  bypass): the cache never exceeds its budget. A value larger than the whole budget is refused up
  front (EmbeddingTooLargeError) before any work is done.
- Each reference carries a lease. A reference whose release never comes (a crashed LM replica) is
  dropped once its lease expires, so its entry becomes evictable again.
No torch here: values are opaque; the caller states their size in bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from runtime.errors import ImageError

V = TypeVar("V")


class EmbeddingTooLargeError(ImageError):
    """The image's embeddings alone exceed the cache's byte budget."""


def embedding_key(image: bytes, processor_config: str, model_identity: str, dtype: str) -> str:
    """sha256 over the image bytes and what the embeddings depend on (never truncated)."""
    h = hashlib.sha256()
    for part in (processor_config.encode(), model_identity.encode(), dtype.encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    h.update(image)
    return h.hexdigest()


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    holders: dict[str, float] = field(default_factory=dict)  # request_id -> lease deadline


@dataclass
class CacheStats:
    entries: int
    bytes: int
    budget_bytes: int
    live_references: int
    hits: int
    misses: int
    evictions: int
    bypasses: int
    in_flight: int
    expired_leases: int


class EmbeddingCache(Generic[V]):
    def __init__(self, budget_bytes: int, lease_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.budget_bytes, self.lease_s, self.clock = budget_bytes, lease_s, clock
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()  # LRU order: oldest first
        self._by_request: dict[str, set[str]] = {}
        self._in_flight: dict[str, asyncio.Future[V]] = {}
        self._bytes = 0
        self._counts = {"hits": 0, "misses": 0, "evictions": 0, "bypasses": 0, "expired_leases": 0}

    async def get_or_compute(self, request_id: str, key: str, nbytes: int,
                             compute: Callable[[], Awaitable[V]]) -> V:
        """The value for key, computed at most once across concurrent callers; referenced by request_id."""
        self.reclaim_expired()
        if nbytes > self.budget_bytes:
            raise EmbeddingTooLargeError(
                f"the image's embeddings need {nbytes} bytes, more than the cache's budget of {self.budget_bytes}")
        entry = self._entries.get(key)
        if entry is not None:
            self._counts["hits"] += 1
            return self._hold(request_id, key, entry)
        pending = self._in_flight.get(key)
        if pending is not None:
            self._counts["hits"] += 1
            value = await asyncio.shield(pending)
            entry = self._entries.get(key)
            return self._hold(request_id, key, entry) if entry is not None else value
        return await self._compute(request_id, key, nbytes, compute)

    async def _compute(self, request_id: str, key: str, nbytes: int, compute: Callable[[], Awaitable[V]]) -> V:
        self._counts["misses"] += 1
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            value = await compute()
        except BaseException as e:  # not swallowed: the waiters and the caller (which logs it) hear it
            future.set_exception(e)
            future.exception()  # retrieved here, so a future nobody awaited does not warn
            raise
        finally:
            del self._in_flight[key]
        if self._make_room(nbytes):
            entry = _Entry(value, nbytes)
            self._entries[key] = entry
            self._bytes += nbytes
            self._hold(request_id, key, entry)
        else:
            self._counts["bypasses"] += 1
        future.set_result(value)
        return value

    def _hold(self, request_id: str, key: str, entry: _Entry[V]) -> V:
        entry.holders[request_id] = self.clock() + self.lease_s
        self._by_request.setdefault(request_id, set()).add(key)
        self._entries.move_to_end(key)
        return entry.value

    def _make_room(self, nbytes: int) -> bool:
        """Evict unreferenced entries, least recently used first, until nbytes fit."""
        if self._bytes + nbytes <= self.budget_bytes:
            return True
        free = sum(e.nbytes for e in self._entries.values() if not e.holders)
        if self._bytes - free + nbytes > self.budget_bytes:
            return False  # only referenced entries could make room: do not touch them
        for key in [k for k, e in self._entries.items() if not e.holders]:
            if self._bytes + nbytes <= self.budget_bytes:
                break
            self._bytes -= self._entries.pop(key).nbytes
            self._counts["evictions"] += 1
        return True

    def release(self, request_id: str) -> int:
        """Drop every reference request_id holds; return how many were dropped."""
        keys = self._by_request.pop(request_id, set())
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                entry.holders.pop(request_id, None)
        return len(keys)

    def reclaim_expired(self) -> int:
        """Drop references whose lease ran out (their release was lost)."""
        now, dropped = self.clock(), 0
        for key, entry in self._entries.items():
            for request_id in [r for r, deadline in entry.holders.items() if deadline <= now]:
                del entry.holders[request_id]
                keys = self._by_request.get(request_id)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_request[request_id]
                dropped += 1
        self._counts["expired_leases"] += dropped
        return dropped

    def stats(self) -> CacheStats:
        return CacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            budget_bytes=self.budget_bytes,
            live_references=sum(len(e.holders) for e in self._entries.values()),
            in_flight=len(self._in_flight),
            **self._counts,
        )
