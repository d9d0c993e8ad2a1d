"""Workarounds for two Ray Serve 2.60 behaviours that the throughput-optimized mode exposes.

1. In-flight child calls.
With gRPC between deployments, Serve tracks every in-flight child call of a request in a dict.
When the request is cancelled (a client leaves mid-stream), `_on_request_cancelled` iterates that
dict and cancels each child, and each cancellation removes its own entry at once: "dictionary
changed size during iteration", and the request ends in a 500 instead of a quiet abort
(tests/reliability/test_leaks.py caught it). Iterating a copy is all the fix needs. Each replica
that makes child calls (Router, LMService) applies it when it starts; it changes nothing else.

2. The inter-deployment gRPC server of every replica binds `[::]:0`, all interfaces, whatever
Ray's node address is (replica.py hardcodes it), so a server meant for loopback only (the embedded
default: launch.ray_environment puts Ray's node address on 127.0.0.1) still opened a port to the
network. Each replica binds it to the node address instead, which is the address Serve advertises
to the callers anyway (tests/e2e/test_http.py checks every listening socket). It must be applied in
the replica's constructor: Serve starts that server right after the constructor returns.
"""

from __future__ import annotations

from typing import Any


def iterate_in_flight_copies() -> None:
    from ray.serve import context
    from ray.serve._private import replica

    def in_flight_copy(parent_request_id: str) -> dict[str, Any]:
        return dict(context._get_in_flight_requests(parent_request_id))

    replica._get_in_flight_requests = in_flight_copy


def bind_internal_grpc_to_node_address() -> None:
    import ray
    from ray.serve._private import replica

    add_port = replica.add_port_to_grpc_server
    if getattr(add_port, "binds_node_address", False):
        return
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def bind_node_address(server: Any, address: str) -> int:
        return add_port(server, address.replace("[::]", host, 1) if address.startswith("[::]:") else address)

    bind_node_address.binds_node_address = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind_node_address


def apply_in_replica() -> None:
    """Both workarounds, from each replica's constructor (Router, LMService, VisionService)."""
    iterate_in_flight_copies()
    bind_internal_grpc_to_node_address()
