"""The address other nodes of the cluster reach this process at (no torch: the router uses it too)."""

from __future__ import annotations

import socket


def node_ip() -> str:
    """The address the other nodes of the cluster reach this process's node at.

    Inside a Ray process that is Ray's own node address (what `ray start --node-ip-address` set,
    the one the GCS gives every other node), whatever the routing table says. Outside Ray: the
    interface of the default route, falling back to loopback when there is none. A replica that
    would advertise loopback while the cluster has other nodes refuses to start (the other nodes
    could never reach it)."""
    import ray  # lazy: offline use and unit tests never start Ray

    if ray.is_initialized():
        address = ray.util.get_node_ip_address()
        if _is_loopback(address) and _alive_nodes() > 1:
            raise RuntimeError(f"this node's address is {address}, but the Ray cluster has other nodes that "
                               "could not reach it: start Ray with --node-ip-address set to a routable address")
        return address
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("localhost", "::1")


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))
