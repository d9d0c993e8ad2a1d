"""Start the app the way users do: a deploy YAML applied to a local Ray cluster (the same code path
as `serve deploy` / `python -m runtime serve`), with real HTTP on a free local port."""

from __future__ import annotations

import os
import random
import socket
import time
from typing import Any

import ray
import requests

from runtime import serve_compat
from runtime.router import launch


def free_port(attempts: int = 500) -> int:
    """A port for Serve's proxy whose next port (the Router's direct ingress) is free too, taken
    below the kernel's ephemeral range and above Ray's worker ports (10002-19999): a port the kernel
    hands out was once taken, between this check and the proxy's bind seconds later, by one of the
    sockets Ray's processes open meanwhile (the proxy then failed to bind, and the module with it)."""
    low, high = 20000, _ephemeral_start()
    for _ in range(attempts):
        port = random.randrange(low, high - 1)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise RuntimeError(f"no free port pair in [{low}, {high})")


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), 20100)
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def deploy_config(args: dict[str, Any] | None = None, replicas: dict[str, int] | None = None,
                  port: int | None = None) -> dict[str, Any]:
    """deploy/local.yaml with overrides (as `python -m runtime serve` applies them)."""
    return launch.load_config(args=args, replicas=replicas, port=port)


class ServeApp:
    def __init__(self, port: int):
        # As `python -m runtime serve` starts Ray (launch.start_ray); restored on close, with the
        # driver's single-machine setting (later modules may start a multi-node cluster).
        self._saved_env = dict(os.environ)
        self._saved_single_machine = serve_compat.single_machine_mode()
        launch.start_ray({"http_options": {"port": port}}, num_cpus=2, include_dashboard=False,
                         configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def deploy(self, config: dict[str, Any], timeout_s: float = 180) -> None:
        launch.deploy(config)
        launch.wait_ready(self.base_url, timeout_s)

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.base_url}/stats", timeout=30).json()

    def wait_drained(self, timeout_s: float = 20) -> dict[str, Any]:
        """/stats once no vision reference, KV block or request is held anywhere (or at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            held = sum(s["cache"]["live_references"] for s in stats["vision"].values())
            held += sum(s["engine"]["kv_blocks_used"] + s["engine"]["running"] + s["engine"]["waiting"]
                        + s["vision_client"]["requests"] for s in stats["lm"].values())
            if (held == 0 and stats["router"]["in_flight"] == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def close(self) -> None:
        """Always ends this Ray cluster and restores the environment, even when Serve never came up
        (a half-started cluster left behind would be joined by the next module's)."""
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(self._saved_env)
            serve_compat.set_single_machine_mode(self._saved_single_machine)
