"""Start the app the way users do: a deploy YAML applied to a local Ray cluster (the same code path
as `serve deploy` / `serve run deploy/local.yaml`), with real HTTP on a free local port."""

from __future__ import annotations

import copy
import socket
import time
from pathlib import Path
from typing import Any

import ray
import requests
import yaml
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]


def load_yaml(name: str = "local.yaml") -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / name).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_overrides(config: dict[str, Any], args: dict[str, Any] | None = None,
                   replicas: dict[str, int] | None = None) -> dict[str, Any]:
    """A copy of a deploy config with some app args merged in and some replica counts changed."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    for key, value in (args or {}).items():
        if isinstance(value, dict):
            app["args"].setdefault(key, {}).update(value)
        else:
            app["args"][key] = value
    for deployment in app.get("deployments", []):
        if deployment["name"] in (replicas or {}):
            deployment["num_replicas"] = replicas[deployment["name"]]
    return config


class ServeApp:
    def __init__(self, port: int):
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.client = serve_api.serve_start(http_options={"host": "127.0.0.1", "port": port})

    def deploy(self, config: dict[str, Any], timeout_s: float = 180) -> None:
        self.client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=False)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 180) -> None:
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            apps = serve.status().applications
            if apps and all(a.status == "RUNNING" for a in apps.values()):
                try:
                    if requests.get(f"{self.base_url}/health", timeout=10).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            if any(a.status == "DEPLOY_FAILED" for a in apps.values()):
                raise RuntimeError(f"deploy failed: {[a.message for a in apps.values()]}")
            time.sleep(0.5)
        raise TimeoutError("the app did not become ready")

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
        from ray import serve

        serve.shutdown()
        ray.shutdown()
