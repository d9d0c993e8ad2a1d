"""Start the app on a local Ray cluster without knowing Ray: `python -m runtime serve`.

It applies a deploy YAML (default: the repository's deploy/local.yaml) through the same code path
as `serve deploy`, so what runs is exactly what the YAML describes; --model and --port override it.
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from runtime.errors import RuntimeServingError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"
DIRECT_PORT_OFFSET = 1  # the first Router replica's own HTTP port, after the proxy's (ray_environment)


def load_config(path: str | Path = DEFAULT_CONFIG, model: str | None = None, port: int | None = None,
                host: str | None = None, args: dict[str, Any] | None = None,
                replicas: dict[str, int] | None = None) -> dict[str, Any]:
    """The deploy config from a YAML file, with the given overrides applied (to its first app)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no deploy config at {path}; pass --config")
    args = {**(args or {}), **({"model": model} if model else {})}
    return with_overrides(yaml.safe_load(path.read_text()), args, replicas, port, host)


def with_overrides(config: dict[str, Any], args: dict[str, Any] | None = None, replicas: dict[str, int] | None = None,
                   port: int | None = None, host: str | None = None) -> dict[str, Any]:
    """A copy with app args merged in (one level deep), some replica counts and the HTTP address changed."""
    config = copy.deepcopy(config)
    app = config["applications"][0]
    app_args = app.setdefault("args", {})
    for key, value in (args or {}).items():
        if isinstance(value, dict):
            app_args.setdefault(key, {}).update(value)
        else:
            app_args[key] = value
    for deployment in app.get("deployments", []):
        if deployment["name"] in (replicas or {}):
            deployment["num_replicas"] = (replicas or {})[deployment["name"]]
    http = config.setdefault("http_options", {})
    if port is not None:
        http["port"] = port
    if host is not None:
        http["host"] = host
    return config


def ray_environment(config: dict[str, Any]) -> dict[str, str]:
    """Environment for the Ray cluster that serves this app: Serve's throughput-optimized mode.

    Ray reads these when its processes start (controller, proxy, replicas), so they must be in the
    environment of whatever starts Ray: `python -m runtime serve` and the test harness set them
    before `ray.init`; on a cluster, export them before `ray start`. What they change, measured at
    16 concurrent streams (bench/README.md): the Router replica serves HTTP itself on its own port
    (direct ingress: no hop through Serve's proxy, which still answers on the configured port and
    balances over Router replicas), handles between deployments use gRPC (see runtime.serve_compat
    for the Ray bug that needs a workaround then), user code runs on the replica's main event loop,
    and request logs are buffered. Direct-ingress ports are the configured
    port + 1 onward (one per Router replica on a node), and a replica drains for 2 s when it stops
    instead of 30 (a local server has no external load balancer to notice it leaving)."""
    http = config.get("http_options", {})
    port = int(http.get("port", 8000))
    env = {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port + DIRECT_PORT_OFFSET),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_PORT_OFFSET + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    if is_loopback(http.get("host", "127.0.0.1")):
        env.update(SINGLE_MACHINE_RAY)
    return env


# A server that answers only on loopback runs a Ray that listens only there. Ray replaces a loopback
# --node-ip-address with the machine's external address and binds every server (GCS, raylet,
# workers, agents) to that node address or to all interfaces; with this setting (named for the
# desktop platforms where it is the default) its node address is 127.0.0.1 and nothing binds
# beyond it. The cluster then takes no other node, which a loopback-only server has no use for.
SINGLE_MACHINE_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def start_ray(config: dict[str, Any], **init_kwargs: Any) -> None:
    """Start the local Ray cluster that serves this app, with ray_environment in its processes'
    environment. Ray reads the single-machine setting when it is imported, and the driver may have
    imported it already: the driver's own copy of the setting is set too, so that ray.init gives
    the node the loopback address as well."""
    import os

    import ray

    from runtime import serve_compat

    env = ray_environment(config)
    os.environ.update(env)
    if env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        serve_compat.set_single_machine_mode(True)
    ray.init(**init_kwargs)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def direct_url(config: dict[str, Any]) -> str:
    """Where the first Router replica answers HTTP itself (see ray_environment)."""
    return base_url(config, DIRECT_PORT_OFFSET)


def check_port_free(config: dict[str, Any]) -> None:
    """Raise if a live process listens on the HTTP port or on the direct-ingress port after it
    (another server would answer our readiness checks). Connections a stopped server closed
    (TIME_WAIT) do not count where it bound with address reuse, as this check does; Serve binds the
    direct-ingress port without it, so after a server stopped with connections open that port stays
    taken for up to a minute (the kernel's TIME_WAIT), for Serve as for this check."""
    http = config.get("http_options", {})
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    for p in (port, port + DIRECT_PORT_OFFSET):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, p))
            except OSError as e:
                raise RuntimeServingError(f"{host}:{p} is already in use ({e.strerror}); pass --port (a server "
                                          "stopped within the last minute may still hold it)") from e


def deploy(config: dict[str, Any]) -> Any:
    """Apply the config to the running local Ray cluster (Serve started with its HTTP options)."""
    from runtime import serve_compat  # Ray is imported when it is needed, not with this module

    return serve_compat.deploy_config(config)


def base_url(config: dict[str, Any], port_offset: int = 0) -> str:
    http = config.get("http_options", {})
    prefix = config["applications"][0].get("route_prefix", "/").rstrip("/")
    return f"http://{http.get('host', '127.0.0.1')}:{int(http.get('port', 8000)) + port_offset}{prefix}"


def wait_ready(url: str, timeout_s: float = 300) -> None:
    """Until /health answers 200 (both pools up), or the deploy failed (raises with Serve's message)."""
    import requests
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        failed = [a.message for a in apps.values() if a.status == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError(f"deploy failed: {failed[0]}")
        if apps and all(a.status == "RUNNING" for a in apps.values()):
            try:
                if requests.get(f"{url}/health", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
        time.sleep(0.5)
    raise TimeoutError(f"the app at {url} was not ready after {timeout_s} s")
