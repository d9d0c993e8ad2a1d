"""Which LM replica runs a request: cache affinity first, load when the favourite is busy.

A request's affinity key is its first image's content key (that replica likely still has the
image's KV blocks in its prefix cache) or, for text, its first `PREFIX_TOKENS` prompt tokens (a
shared system prompt). Rendezvous hashing maps a key to one replica: every router replica agrees
without talking, and adding or removing a replica moves only the keys that hashed to it. If the
favourite has `slack` more requests than the least-loaded replica, load wins.

Load is what Serve's router knows of each replica's ongoing requests, or else the engine's own
running + waiting count that LM replicas report through `record_routing_stats`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RunningReplica

from runtime.serve_compat import TargetedFIFORouter

PREFIX_TOKENS = 64


def affinity_key(request: Any) -> str | None:
    """The GenerateRequest's cache-affinity key, or None (no affinity: short text prompts)."""
    keys = getattr(request, "image_keys", None)
    if keys:
        return f"image:{keys[0]}"
    ids = getattr(request, "prompt_ids", None)
    if ids and len(ids) >= PREFIX_TOKENS:
        return "prefix:" + hashlib.sha256(repr(ids[:PREFIX_TOKENS]).encode()).hexdigest()
    return None


def rendezvous(key: str, replicas: Sequence[str]) -> str:
    """The replica with the highest hash of (key, replica): stable as replicas come and go."""
    return max(replicas, key=lambda r: hashlib.sha256(f"{key}|{r}".encode()).digest())


def rank(key: str | None, loads: dict[str, float], slack: float) -> list[list[str]]:
    """Replica ids in ranked groups: the favourite alone when it is not much busier than the
    least-loaded replica, then the rest from least to most loaded."""
    if not loads:
        return []
    by_load = sorted(loads, key=lambda r: (loads[r], r))
    if key is None:
        return [[by_load[0]], by_load[1:]] if len(by_load) > 1 else [by_load]
    favourite = rendezvous(key, list(loads))
    if loads[favourite] - loads[by_load[0]] > slack:
        favourite = by_load[0]
    rest = [r for r in by_load if r != favourite]
    return [[favourite], rest] if rest else [[favourite]]


def _target(pending: PendingRequest) -> str | None:
    """The replica an admin call (runtime.protocol.AdminCall) is meant for; None for any other call."""
    target = getattr(pending.args[0], "replica", None) if pending.args else None
    return target if isinstance(target, str) else None


class AffinityRouter(TargetedFIFORouter):
    def accepts(self, pending: PendingRequest, replica_id: str) -> bool:
        """An admin call goes to the replica it names and no other: it is passed over for any other
        replica. (Serve's exact matching cannot be used instead: sibling calls of one HTTP request,
        its n choices, share an internal request id.)"""
        return _target(pending) in (None, replica_id)

    def initialize_state(self, slack: float = 4.0, **kwargs: Any) -> None:
        self.slack = slack

    def _load(self, replica: RunningReplica) -> float:
        queued = self.replica_queue_len_cache.get(replica.replica_id)
        if queued is not None:
            return float(queued)
        stats = replica.routing_stats or {}
        return float(stats.get("running", 0) + stats.get("waiting", 0))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        # A replica whose engine stopped says so in its stats until Serve's health check replaces
        # it; send nothing there while another replica can take the request.
        healthy = [r for r in candidate_replicas if (r.routing_stats or {}).get("healthy", True)]
        by_id = {r.replica_id.unique_id: r for r in healthy or candidate_replicas}
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        target = getattr(request, "replica", None)
        if isinstance(target, str):  # an admin call: that replica, whatever its load or health
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        ranked = rank(affinity_key(request), {rid: self._load(r) for rid, r in by_id.items()}, self.slack)
        return [[by_id[rid] for rid in group] for group in ranked if group]
