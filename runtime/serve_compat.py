"""Every use of Ray's private API, in one place (no other module imports `ray._private` or
`ray.serve._private`: a ruff banned-api rule in pyproject.toml enforces it). `RELIES_ON` lists each
private symbol used here, and tests/unit/test_serve_compat.py checks them against the installed Ray,
so a Ray upgrade that moves one fails that test by name instead of a replica at run time.

1. The request router's replica hand-over (TargetedFIFORouter).
Serve's public RequestRouter assigns a found replica to a waiting request in a private hook;
the LM pool's router needs that hook to pass an admin call over for every replica but its own.

2. In-flight child calls (iterate_in_flight_copies).
With gRPC between deployments, Serve tracks every in-flight child call of a request in a dict.
When the request is cancelled (a client leaves mid-stream), `_on_request_cancelled` iterates that
dict and cancels each child, and each cancellation removes its own entry at once: "dictionary
changed size during iteration", and the request ends in a 500 instead of a quiet abort
(tests/reliability/test_leaks.py caught it). Iterating a copy is all the fix needs. Each replica
that makes child calls (Router, LMService) applies it when it starts; it changes nothing else.

3. The inter-deployment gRPC server's address (bind_internal_grpc_to_node_address).
The inter-deployment gRPC server of every replica binds `[::]:0`, all interfaces, whatever
Ray's node address is (replica.py hardcodes it), so a server meant for loopback only (the embedded
default: launch.ray_environment puts Ray's node address on 127.0.0.1) still opened a port to the
network. Each replica binds it to the node address instead, which is the address Serve advertises
to the callers anyway (tests/e2e/test_http.py checks every listening socket). It must be applied in
the replica's constructor: Serve starts that server right after the constructor returns.

4. Starting a local cluster and applying a deploy config without the dashboard (launch).
Ray reads its single-machine setting once, at import (set_single_machine_mode sets the driver's
copy); `serve deploy` goes through the dashboard, which a local server does not start, so the
config is applied the way `serve run config.yaml` does it (deploy_config).
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

# (module, attribute, the parameters it must take or None): what this module reaches into.
RELIES_ON: tuple[tuple[str, str, tuple[str, ...] | None], ...] = (
    ("ray.serve._private.request_router.request_router", "RequestRouter._fulfill_next_pending_request",
     ("self", "replica", "request_metadata")),
    ("ray.serve._private.request_router.request_router", "RequestRouter._cancel_routing_task_for_pending_request",
     ("self", "pending_request")),
    ("ray.serve._private.request_router.request_router", "RequestRouter._record_queue_wait_time",
     ("self", "pending_request")),
    ("ray.serve._private.request_router.request_router", "RequestRouter._remove_pending_request_from_indices",
     ("self", "pending_request")),
    ("ray.serve._private.request_router.request_router", "FIFOMixin._pending_requests_to_fulfill", None),
    ("ray.serve._private.request_router.common", "PendingRequest.future", None),
    ("ray.serve._private.replica", "_get_in_flight_requests", ("parent_request_id",)),
    ("ray.serve._private.replica", "add_port_to_grpc_server", ("server", "address")),
    ("ray.serve.context", "_get_in_flight_requests", ("parent_request_id",)),
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER", None),
    ("ray.serve._private.api", "serve_start", ("http_options",)),
    ("ray.serve._private.client", "ServeControllerClient.deploy_apps", ("self", "config", "_blocking")),
)

# --- 1. the request router ------------------------------------------------------------------


class TargetedFIFORouter(FIFOMixin, RequestRouter):
    """FIFOMixin's order (the oldest waiting request takes the replica found), except that a waiting
    request may refuse a replica (`accepts`): it is passed over, and waits for another."""

    def accepts(self, pending: PendingRequest, replica_id: str) -> bool:
        return True

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata: Any = None) -> None:
        mine = replica.replica_id.unique_id
        for pending in list(self._pending_requests_to_fulfill):
            if pending.future.done():
                self._pending_requests_to_fulfill.remove(pending)
            elif self.accepts(pending, mine):
                self._pending_requests_to_fulfill.remove(pending)
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return


# --- 2 and 3. replica patches -----------------------------------------------------------------


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
    """Both replica workarounds, from each replica's constructor (Router, LMService, VisionService)."""
    iterate_in_flight_copies()
    bind_internal_grpc_to_node_address()


# --- 4. launch --------------------------------------------------------------------------------


def single_machine_mode() -> bool:
    """Whether this driver's Ray refuses other nodes (its node address then stays on loopback)."""
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def set_single_machine_mode(on: bool) -> None:
    """The driver's copy of RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read by Ray when it was imported."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = not on


def deploy_config(config: dict[str, Any]) -> Any:
    """Apply a deploy config (the YAML's dict) to the running cluster, Serve started with its HTTP
    options; returns Serve's client without waiting for the apps."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump())
    client.deploy_apps(schema, _blocking=False)
    return client
