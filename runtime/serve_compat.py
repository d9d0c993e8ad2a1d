"""A workaround for a Ray Serve 2.60 bug that the throughput-optimized mode exposes.

With gRPC between deployments, Serve tracks every in-flight child call of a request in a dict.
When the request is cancelled (a client leaves mid-stream), `_on_request_cancelled` iterates that
dict and cancels each child, and each cancellation removes its own entry at once: "dictionary
changed size during iteration", and the request ends in a 500 instead of a quiet abort
(tests/reliability/test_leaks.py caught it). Iterating a copy is all the fix needs. Each replica
that makes child calls (Router, LMService) applies it when it starts; it changes nothing else.
"""

from __future__ import annotations

from typing import Any


def iterate_in_flight_copies() -> None:
    from ray.serve import context
    from ray.serve._private import replica

    def in_flight_copy(parent_request_id: str) -> dict[str, Any]:
        return dict(context._get_in_flight_requests(parent_request_id))

    replica._get_in_flight_requests = in_flight_copy
