"""A replica advertises the address other nodes reach it at."""

from __future__ import annotations

import pytest

from runtime import node_address
from runtime.node_address import node_ip


def _fake_ray_node(monkeypatch, address: str, alive_nodes: int) -> None:
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: address)
    monkeypatch.setattr(node_address, "_alive_nodes", lambda: alive_nodes)


def test_a_ray_process_advertises_rays_node_address_not_the_default_routes(monkeypatch) -> None:
    # A host without a default route: the routing-table guess would give loopback; Ray knows better.
    _fake_ray_node(monkeypatch, "10.77.0.2", alive_nodes=2)
    assert node_ip() == "10.77.0.2"


def test_loopback_is_refused_when_other_nodes_could_not_reach_it(monkeypatch) -> None:
    _fake_ray_node(monkeypatch, "127.0.0.1", alive_nodes=2)
    with pytest.raises(RuntimeError, match="could not reach"):
        node_ip()
    _fake_ray_node(monkeypatch, "127.0.0.1", alive_nodes=1)  # one node: loopback is right
    assert node_ip() == "127.0.0.1"
