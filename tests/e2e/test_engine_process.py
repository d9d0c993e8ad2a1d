"""The default LM replica steps its engine in a process of its own (engine.engine_process): that
process dying fails only the streams it carried, takes the replica out through its health check
until Serve replaces it, and leaves no vision reference held; a replica killed outright takes its
engine process with it."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body, post
from tests.e2e.test_pools import _stream_until_end, _wait_for
from tests.integration.workload import png


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("core-cache")
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config({"cache_dir": str(cache_dir), "vision": {"lease_s": 5.0}}, port=port))
        yield served
    finally:
        served.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _replica(served) -> tuple[str, dict]:
    _wait_for(lambda: len(served.stats()["lm"]) == 1, what="one LM replica")
    ((name, stats),) = served.stats()["lm"].items()
    return name, stats


def test_the_engine_process_dying_fails_its_streams_and_the_replica_is_replaced(app) -> None:
    served = app
    victim, stats = _replica(served)
    assert stats["engine_pid"] != stats["pid"]  # the default: a process of its own
    jobs = [body(f"long {i}", [png(70, 70 + 14 * i, seed=5000 + i)], max_tokens=3000) for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_stream_until_end, served, job) for job in jobs]
        _wait_for(lambda: served.stats()["lm"][victim]["engine"]["running"] > 0, 60, "requests to run")
        os.kill(stats["engine_pid"], signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    assert all(status == 200 and errored for status, _, errored in results), results  # ended, none hung
    _wait_for(lambda: victim not in served.stats()["lm"] and len(served.stats()["lm"]) == 1, 180,
              "Serve to replace the replica whose engine died")
    assert [post(served, "/v1/chat/completions", body(f"after {i}", [png(56, 56, seed=6000 + i)])).status_code
            for i in range(3)] == [200] * 3
    drained = served.wait_drained(timeout_s=30)
    assert sum(s["cache"]["live_references"] for s in drained["vision"].values()) == 0


def test_a_replica_killed_outright_takes_its_engine_process_with_it(app) -> None:
    served = app
    victim, stats = _replica(served)
    os.kill(stats["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while _alive(stats["engine_pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stats["engine_pid"]), "the engine process outlived its replica"
    _wait_for(lambda: victim not in served.stats()["lm"] and len(served.stats()["lm"]) == 1, 180,
              "Serve to replace the killed replica")
    assert post(served, "/v1/chat/completions", body("after the kill", [])).status_code == 200
