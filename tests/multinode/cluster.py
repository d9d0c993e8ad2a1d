"""Two Ray nodes on one machine with a real network between them.

The head (with the test's driver and HTTP client) stays in the root network namespace; the vision
node runs in a namespace of its own, joined to the root one by a veth pair and nothing else: it has
no default route, only the link to the head. Each node is a `ray start` of its own, with its own
temp dir, its own custom resource (`lm_host` on the head, `vision_host` on the other) and token
authentication on, as a cluster spread over machines runs.

Every process a node starts is found by its temp dir (each Ray process names its session dir on its
command line) and ended by PID: other Ray clusters may run on this machine, so nothing is killed by
name and `ray stop` (which stops every Ray of the user) is never run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
# Environment a Ray process must not inherit from the test process: a cluster of another test, or
# Ray's single-machine mode (under which the node address is loopback and no other node may join).
_NOT_INHERITED = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_TOKEN_PATH")


def unavailable() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"kmnprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def auth_token() -> str:
    """The cluster's token: the one in ~/.ray/auth_token (made if missing), as Ray's own CLI and
    ray.init read it; each node is handed it explicitly, as a node on another machine must be."""
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )

    path = _get_default_token_path()
    if not path.is_file():
        generate_and_save_token()
    return path.read_text().strip()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Node:
    name: str
    address: str
    temp_dir: Path
    resources: dict[str, float]
    namespace: str | None = None  # None: the root namespace

    def pids(self) -> list[int]:
        """Every live process of this node: those that name its temp dir on their command line (GCS,
        raylet, log monitor) and their descendants (workers retitle themselves `ray::...`)."""
        mark = str(self.temp_dir)
        found: set[int] = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(mark in arg for arg in proc.info["cmdline"] or ()):
                    found.add(proc.pid)
                    found.update(child.pid for child in proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found.discard(os.getpid())
        return sorted(found)

    def raylet_pid(self) -> int | None:
        for pid in self.pids():
            try:
                if psutil.Process(pid).name() == "raylet":
                    return pid
            except psutil.NoSuchProcess:
                continue
        return None

    def kill_pid(self, pid: int) -> None:
        """SIGKILL one process of this node (refused for any other process)."""
        if pid not in self.pids():
            raise ValueError(f"process {pid} is not one of node {self.name}'s")
        os.kill(pid, signal.SIGKILL)

    def kill(self) -> list[int]:
        """SIGKILL every process of this node, by PID; returns them."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and _alive(p) for p in pids):
            time.sleep(0.1)
        return pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class TwoHosts:
    """The network, the head node (root namespace) and the vision node (a namespace of its own)."""

    def __init__(self, env: dict[str, str] | None = None):
        tag = os.getpid() % 100_000
        subnet = f"10.77.{tag % 250 + 1}"
        self.namespace = f"kmn{tag}"
        self.head_link, self.node_link = f"kmn{tag}a", f"kmn{tag}b"  # the veth ends (root side, child side)
        self.head = Node("head", f"{subnet}.1", Path(f"/tmp/kmn{tag}h"), {"lm_host": 1})
        self.vision = Node("vision", f"{subnet}.2", Path(f"/tmp/kmn{tag}v"), {"vision_host": 1}, self.namespace)
        self.gcs_port = 0
        self.token = auth_token()
        self.env = {**{k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}, **(env or {}),
                    "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
        self.log: list[str] = []

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{self.gcs_port}"

    # --- the network -------------------------------------------------------------------------

    def make_network(self) -> None:
        ns, a, b = self.namespace, self.head_link, self.node_link
        self._ip("netns", "add", ns)
        self._ip("link", "add", a, "type", "veth", "peer", "name", b)
        self._ip("link", "set", b, "netns", ns)
        self._ip("addr", "add", f"{self.head.address}/24", "dev", a)
        self._ip("link", "set", a, "up")
        self._ip("netns", "exec", ns, "ip", "addr", "add", f"{self.vision.address}/24", "dev", b)
        self._ip("netns", "exec", ns, "ip", "link", "set", b, "up")
        self._ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def link(self, up: bool) -> None:
        """Cut (or restore) the wire between the nodes: the root end of the veth down (or up)."""
        self._ip("link", "set", self.head_link, "up" if up else "down")

    def remove_network(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)  # takes its veth end along
        subprocess.run(["ip", "link", "del", self.head_link], capture_output=True)  # gone already, normally

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    # --- the Ray nodes -----------------------------------------------------------------------

    def start_head(self) -> None:
        self.gcs_port = free_port(self.head.address)
        self._ray_start(self.head, "--head", "--port", str(self.gcs_port), "--include-dashboard=false",
                        "--ray-client-server-port", str(free_port(self.head.address)))

    def start_vision_node(self) -> None:
        self._ray_start(self.vision, "--address", self.gcs_address)

    def _ray_start(self, node: Node, *args: str) -> None:
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        agent_port = free_port(node.address) if node.namespace is None else 52365
        command = [RAY, "start", *args, "--node-ip-address", node.address, "--num-cpus", "2",
                   "--resources", json.dumps(node.resources), "--temp-dir", str(node.temp_dir),
                   "--dashboard-agent-listen-port", str(agent_port), "--disable-usage-stats"]
        if node.namespace is not None:
            command = ["ip", "netns", "exec", node.namespace, *command]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        self.log.append(f"$ {' '.join(command)}\n{done.stdout}\n{done.stderr}")
        if done.returncode != 0:
            raise RuntimeError(f"ray start ({node.name}) failed:\n{done.stdout}\n{done.stderr}")

    def connect(self) -> None:
        """Join the cluster as a driver from this (root-namespace) process, with token auth on."""
        import ray
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray caches the mode when first imported; as its own _enable_token_auth does
        ray.init(address=self.gcs_address, _node_ip_address=self.head.address, configure_logging=False,
                 log_to_driver=False)

    def alive_nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def wait_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.alive_nodes()} Ray nodes alive after {timeout_s} s, expected {count}")
            time.sleep(0.5)

    def start(self) -> None:
        self.make_network()
        self.start_head()
        self.start_vision_node()

    def stop(self) -> None:
        for node in (self.vision, self.head):
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.remove_network()
