"""Independent scaling: change one pool's replica count in the deploy YAML and apply it again while
requests are in flight. The other pool keeps its replicas (same identities, no restart), in-flight
requests finish, and the new replicas take work."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from runtime.router import launch
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body, post
from tests.integration.workload import png


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    port = free_port()
    served = ServeApp(port)
    args = {"cache_dir": str(tmp_path_factory.mktemp("scale-cache"))}
    try:
        served.deploy(deploy_config(args, port=port))
        yield served, args
    finally:
        served.close()


DEPLOYMENTS = {"lm": "LMService", "vision": "VisionService"}


def _replicas(served, pool: str, count: int, timeout_s: float = 120) -> dict:
    """The pool's replicas once `count` of them report and Serve routes to all of them."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replicas = served.stats()[pool]
        states = serve.status().applications["kimi"].deployments[DEPLOYMENTS[pool]].replica_states
        if len(replicas) == count and states.get("RUNNING", 0) == count:
            time.sleep(1.0)  # handles learn of new replicas through a long poll
            return replicas
        time.sleep(0.3)
    raise TimeoutError(f"{pool} did not reach {count} replicas")


def _long_requests(served, n: int, seed: int):
    """n streaming requests with images that run for a while; returns a future of their results."""
    def one(i: int) -> tuple[int, str | None]:
        request = body(f"keep going {i}", [png(70 + 14 * i, 70, seed=seed + i)], max_tokens=400, stream=True)
        response = post(served, "/v1/chat/completions", request, stream=True)
        reason = None
        for line in response.iter_lines():
            if line.startswith(b"data: {") and b'"finish_reason":"' in line.replace(b" ", b""):
                reason = line.split(b'"finish_reason":')[1].split(b'"')[1].decode()
        return response.status_code, reason

    pool = ThreadPoolExecutor(n)
    return pool, [pool.submit(one, i) for i in range(n)]


def _burst(served, n: int, seed: int) -> list[int]:
    """n concurrent requests long enough (64 tokens) that load-aware routing spreads them."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: post(served, "/v1/chat/completions", body(
            f"burst {i}", [png(84, 84, seed=seed + i)], max_tokens=64)).status_code, range(n)))


def _until_every_replica_works(served, pool: str, work, seed: int, timeout_s: float = 30) -> dict:
    """Bursts of 8 until every replica of the pool did some work, or the deadline. A new replica
    reaches the handles that call it through a long poll (and stats are posted every 0.25 s), so
    the first burst after it is RUNNING may all go to the old one."""
    deadline = time.monotonic() + timeout_s
    for burst in itertools.count():
        assert _burst(served, 8, seed=seed + 8 * burst) == [200] * 8
        time.sleep(0.5)
        done = {r: work(s) for r, s in served.stats()[pool].items()}
        if all(d > 0 for d in done.values()) or time.monotonic() > deadline:
            return done
    raise AssertionError("unreachable")


def test_scale_vision_then_lm_without_touching_the_other_pool(app) -> None:
    served, args = app
    lm_before = set(_replicas(served, "lm", 1))
    vision_before = set(_replicas(served, "vision", 1))

    pool, running = _long_requests(served, 4, seed=500)
    time.sleep(0.5)
    launch.deploy(deploy_config(args, {"LMService": 1, "VisionService": 2}, port=served.port))
    vision_now = _replicas(served, "vision", 2)
    assert set(_replicas(served, "lm", 1)) == lm_before, "the LM replica was restarted"
    assert vision_before <= set(vision_now), "the first vision replica was replaced"
    assert [f.result(timeout=300) for f in running] == [(200, "length")] * 4
    pool.shutdown()

    misses = _until_every_replica_works(served, "vision", lambda s: s["cache"]["misses"], seed=600)
    assert all(m > 0 for m in misses.values()), f"a vision replica got no work: {misses}"

    pool, running = _long_requests(served, 4, seed=700)
    time.sleep(0.5)
    launch.deploy(deploy_config(args, {"LMService": 2, "VisionService": 2}, port=served.port))
    lm_now = _replicas(served, "lm", 2)
    assert lm_before <= set(lm_now), "the first LM replica was replaced"
    assert set(_replicas(served, "vision", 2)) == set(vision_now), "a vision replica was restarted"
    assert [f.result(timeout=300) for f in running] == [(200, "length")] * 4
    pool.shutdown()

    generated = _until_every_replica_works(served, "lm", lambda s: s["engine"]["generated_tokens"], seed=800)
    assert all(g > 0 for g in generated.values()), f"an LM replica got no work: {generated}"

    stats = served.wait_drained()
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0
    assert requests.get(f"{served.base_url}/health", timeout=30).status_code == 200

