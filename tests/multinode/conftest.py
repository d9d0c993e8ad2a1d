"""One two-node cluster for the whole package (tests/multinode/cluster.py), the app from
deploy/multinode.yaml on it, and the test process as the driver and HTTP client in the head's
namespace. Skipped, with the reason, where network namespaces cannot be made (not root)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.router import launch
from tests.e2e.serve_app import ServeApp, free_port
from tests.multinode.cluster import TwoHosts, unavailable

YAML = Path(__file__).resolve().parents[2] / "deploy" / "multinode.yaml"
# Short deadlines, so that a lost host costs seconds, not minutes (the defaults suit real loads).
TEST_ARGS: dict[str, Any] = {
    "vision": {"encode_timeout_s": 10, "arrival_timeout_s": 5, "lease_s": 30},
    "limits": {"request_timeout_s": 30},
}


class MultiNodeApp(ServeApp):
    """ServeApp's helpers (deploy, stats, wait_drained) over the two-node cluster."""

    def __init__(self, hosts: TwoHosts, model_dir: Path, port: int):
        self.hosts, self.model_dir, self.port = hosts, model_dir, port
        self.config = self.configure()
        self.base_url = launch.base_url(self.config)

    def configure(self, args: dict[str, Any] | None = None, replicas: dict[str, int] | None = None) -> dict[str, Any]:
        """deploy/multinode.yaml for this cluster, with the test's deadlines and these overrides."""
        return multinode_config(self.model_dir, self.hosts.head.address, self.port, args, replicas)

    def apply(self, config: dict[str, Any], timeout_s: float = 240) -> None:
        self.config = config
        self.deploy(config, timeout_s)

    def vision_client(self) -> dict[str, int]:
        """The LM replicas' vision-client counters, summed (they only grow)."""
        counts: dict[str, int] = {}
        for lm in self.stats()["lm"].values():
            for key, value in lm["vision_client"].items():
                counts[key] = counts.get(key, 0) + value
        return counts

    def vision_client_since(self, before: dict[str, int], releases: int, timeout_s: float = 20) -> dict[str, int]:
        """The counters' growth since `before`, once at least `releases` more releases were sent
        (replicas post their stats every 0.25 s, so a snapshot may lag the last request)."""
        deadline = time.monotonic() + timeout_s
        while True:
            grown = {k: v - before.get(k, 0) for k, v in self.vision_client().items()}
            if grown["releases_sent"] + grown["releases_dropped"] >= releases or time.monotonic() > deadline:
                return grown
            time.sleep(0.25)

    def can_reach(self, address: str, from_vision_node: bool) -> bool:
        """Whether a TCP connection to a tcp://host:port address opens from the head's namespace or
        from the vision node's."""
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=5).close()"
        command = [sys.executable, "-c", probe]
        if from_vision_node:
            command = ["ip", "netns", "exec", self.hosts.namespace, *command]
        return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


def multinode_config(model_dir: Path, host: str, port: int, args: dict[str, Any] | None = None,
                     replicas: dict[str, int] | None = None) -> dict[str, Any]:
    merged = {"model": str(model_dir), **TEST_ARGS}
    for key, value in (args or {}).items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return launch.load_config(YAML, args=merged, replicas=replicas, port=port, host=host)


@pytest.fixture(scope="package")
def hosts():
    reason = unavailable()
    if reason:
        pytest.skip(f"two hosts need network namespaces: {reason}")
    saved = dict(os.environ)
    two = TwoHosts()
    port = free_port()
    # Serve's settings for every Ray process (launch.ray_environment; a non-loopback HTTP host, so
    # not Ray's single-machine mode), on both nodes.
    two.env.update(launch.ray_environment({"http_options": {"host": two.head.address, "port": port}}))
    try:
        two.start()
        two.connect()
        two.wait_nodes(2)
        yield two, port
    finally:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            two.stop()
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    from runtime.checkpoint.maker import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("multinode") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="package")
def app(hosts, model_dir):
    two, port = hosts
    served = MultiNodeApp(two, model_dir, port)
    served.apply(served.config)
    return served
