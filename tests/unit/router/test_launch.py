"""What `python -m runtime serve` checks and sets before Ray starts."""

from __future__ import annotations

import socket

import pytest

from runtime.errors import RuntimeServingError
from runtime.router import launch


def _config(port: int) -> dict:
    return launch.with_overrides({"applications": [{"name": "kimi", "route_prefix": "/"}]}, port=port)


def _free_pair() -> int:
    """A port P with P + 1 free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            launch.check_port_free(_config(port))
            return port
        except RuntimeServingError:
            continue
    raise RuntimeError("no free pair of ports")


def test_a_port_left_by_a_stopped_server_is_free_at_once() -> None:
    port = _free_pair()
    server = socket.create_server(("127.0.0.1", port))
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection sits in TIME_WAIT
    client.close()
    server.close()
    launch.check_port_free(_config(port))  # no live listener: free


@pytest.mark.parametrize("offset", [0, 1])
def test_a_live_listener_on_the_port_or_the_direct_port_is_refused(offset: int) -> None:
    port = _free_pair()
    with socket.create_server(("127.0.0.1", port + offset)), pytest.raises(RuntimeServingError, match="in use"):
        launch.check_port_free(_config(port))


def test_the_ray_environment_puts_direct_ingress_on_the_next_port() -> None:
    env = launch.ray_environment(_config(8123))
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8124"
    assert launch.direct_url(_config(8123)) == "http://127.0.0.1:8124"


@pytest.mark.parametrize("host,loopback_only", [(None, True), ("127.0.0.1", True), ("localhost", True),
                                                ("::1", True), ("0.0.0.0", False), ("10.1.2.3", False)])
def test_a_loopback_server_runs_a_loopback_only_ray(host, loopback_only) -> None:
    config = launch.with_overrides({"applications": [{"name": "kimi"}]}, port=8000, host=host)
    env = launch.ray_environment(config)
    assert (env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0") == loopback_only
