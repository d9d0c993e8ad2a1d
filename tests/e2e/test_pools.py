"""Two LM replicas with two expert-parallel ranks each (Ray actors in each replica's placement
group) and one vision replica, over HTTP: a concurrent workload succeeds on both replicas, requests
that repeat an image go to the replica that already has it, afterwards nothing is held, and a
replica killed mid-stream fails only its own requests."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime.protocol import SamplingParams
from runtime.router.prepare import RequestPreparer
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body, post
from tests.integration.workload import chat, png, reference_inputs
from tests.reference import reference_greedy, reference_model


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("pools-cache")
    args = {"cache_dir": str(cache_dir), "engine": {"ep_size": 2, "cpus_per_rank": 0.25},
            "vision": {"cpus": 0.25, "lease_s": 5.0}}
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config(args, {"LMService": 2, "VisionService": 1}, port=port))
        yield served, cache_dir / "tiny"
    finally:
        served.close()


def _generated(served) -> dict[str, int]:
    time.sleep(0.6)  # replicas post their stats every 0.25 s
    return {r: s["engine"]["generated_tokens"] for r, s in served.stats()["lm"].items()}


def test_two_lm_replicas_with_two_ep_ranks_each(app) -> None:
    served, model_dir = app
    lm = served.stats()["lm"]
    assert len(lm) == 2 and all(len(s["engine"]["ep_expert_bytes"]) == 2 for s in lm.values())
    assert all(s["engine"]["ep_size"] == 2 for s in lm.values())

    image = png(112, 84, seed=41)
    answer = post(served, "/v1/chat/completions", body("what is this", [image], return_token_ids=True)).json()
    prep = RequestPreparer(model_dir, "float32", trust_remote_code=False)
    request = chat("what is this", [image], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    expected, _ = reference_greedy(reference_model(str(model_dir)), reference_inputs(prep, request), 8)
    assert answer["choices"][0]["token_ids"] == expected

    jobs = [body(f"job {i}", [png(56 + 14 * (i % 4), 84, seed=900 + i)] if i % 3 else [], max_tokens=32)
            for i in range(16)]
    before = _generated(served)
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: post(served, "/v1/chat/completions", b).status_code, jobs))
    after = _generated(served)
    assert statuses == [200] * 16
    assert all(after[r] > before[r] for r in after), f"an LM replica got no work: {before} -> {after}"


def test_repeated_images_go_to_the_replica_that_has_them(app) -> None:
    served, _ = app
    homes = set()
    for k in range(4):
        image = png(98, 70, seed=1000 + k)
        landed = set()
        for repeat in range(3):
            before = _generated(served)
            response = post(served, "/v1/chat/completions", body(f"again {repeat}", [image]))
            assert response.status_code == 200
            after = _generated(served)
            landed |= {r for r in after if after[r] != before.get(r, 0)}
        assert len(landed) == 1, f"image {k} was served by {landed}"
        homes |= landed
    cached = sum(s["engine"]["prefix_hit_tokens"] for s in served.stats()["lm"].values())
    assert cached > 0

    stats = served.wait_drained()
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0


def _stream_until_end(served, payload) -> tuple[int, str | None, bool]:
    """(status, finish_reason, whether an error event came) of one streamed request."""
    response = post(served, "/v1/chat/completions", {**payload, "stream": True}, stream=True)
    reason, errored = None, False
    for line in response.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[len(b"data: "):])
        if "error" in event:
            errored = True
        elif event.get("choices") and event["choices"][0].get("finish_reason"):
            reason = event["choices"][0]["finish_reason"]
    return response.status_code, reason, errored


def test_killing_an_lm_replica_mid_stream_fails_only_its_requests(app) -> None:
    """Its streams end with an error event, the other replica's finish, Serve replaces it, new
    requests succeed, and the vision references it held expire by lease."""
    served, _ = app
    stats = served.stats()["lm"]
    victim, survivor = sorted(stats)
    jobs = [body(f"long {i}", [png(70, 70 + 14 * i, seed=2000 + i)], max_tokens=3000) for i in range(6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_stream_until_end, served, job) for job in jobs]
        deadline = time.monotonic() + 60
        while served.stats()["lm"][victim]["engine"]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert served.stats()["lm"][victim]["engine"]["running"] > 0, "no request reached the victim"
        os.kill(stats[victim]["pid"], signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
    failed = [r for r in results if r[2]]
    assert failed and all(r[0] == 200 for r in results)
    assert all(r[1] == "length" for r in results if not r[2])

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(served.stats()["lm"]) != 2 or victim in served.stats()["lm"]):
        time.sleep(0.5)
    assert victim not in served.stats()["lm"] and len(served.stats()["lm"]) == 2, "Serve did not replace it"
    assert survivor in served.stats()["lm"]
    assert [post(served, "/v1/chat/completions", body(f"after {i}", [])).status_code for i in range(4)] == [200] * 4
    drained = served.wait_drained(timeout_s=30)  # the victim's references expire by the 5 s lease
    assert sum(s["cache"]["live_references"] for s in drained["vision"].values()) == 0


def _wait_for(predicate, timeout_s: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def test_an_ep_rank_dying_takes_its_replica_out_without_a_hang(app) -> None:
    """Requests that hit the broken replica end with an error (no hang), Serve replaces it, and
    requests after that all succeed."""
    served, _ = app
    _wait_for(lambda: len(served.stats()["lm"]) == 2, what="two LM replicas")
    lm = served.stats()["lm"]
    victim = sorted(lm)[0]
    os.kill(lm[victim]["engine"]["ep_rank_pids"][1], signal.SIGKILL)
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: post(served, "/v1/chat/completions", body(
            f"after rank death {i}", [png(84, 56 + 14 * i, seed=4000 + i)], max_tokens=16)).status_code, range(6)))
    assert all(s in (200, 500) for s in statuses), statuses  # answered, none hung
    _wait_for(lambda: victim not in served.stats()["lm"] and len(served.stats()["lm"]) == 2, 180,
              "Serve to replace the replica whose rank died")
    assert all(s["healthy"] for s in served.stats()["lm"].values())
    assert [post(served, "/v1/chat/completions", body(f"healed {i}", [], max_tokens=4)).status_code
            for i in range(6)] == [200] * 6


def test_killing_the_vision_replica_while_it_holds_references(app) -> None:
    """Requests already generating finish; Serve replaces the vision replica; new image requests
    work; the LM replicas free everything."""
    served, _ = app
    _wait_for(lambda: len(served.stats()["lm"]) == 2, what="two LM replicas")
    vision = served.stats()["vision"]
    (old, stats), = vision.items()
    jobs = [body(f"hold {i}", [png(70, 84, seed=5000 + i)], max_tokens=600) for i in range(4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(_stream_until_end, served, job) for job in jobs]
        _wait_for(lambda: served.stats()["vision"][old]["cache"]["live_references"] > 0, 60, "references held")
        os.kill(stats["pid"], signal.SIGKILL)
        results = [f.result(timeout=300) for f in futures]
    assert all(status == 200 for status, _, _ in results)
    assert all(reason == "length" or errored for _, reason, errored in results)
    _wait_for(lambda: old not in served.stats()["vision"] and len(served.stats()["vision"]) == 1, 180,
              "Serve to replace the vision replica")
    assert post(served, "/v1/chat/completions", body("new image", [png(98, 98, seed=5100)])).status_code == 200
    drained = served.wait_drained(timeout_s=30)
    assert sum(s["engine"]["kv_blocks_used"] + s["vision_client"]["requests"] for s in drained["lm"].values()) == 0
    assert sum(s["cache"]["live_references"] for s in drained["vision"].values()) == 0


def _our_live_actors() -> list[dict]:
    """Live actors of the runtime's own classes or names, from the GCS (ray.util.state's
    list_actors needs the dashboard, which the test cluster does not start)."""
    from ray._private import state

    from runtime.lm_service.ray_ranks import _RankActor
    from runtime.stats_board import StatsBoard

    ours = {StatsBoard.__name__, _RankActor.__name__}
    return [a for a in state.actors().values() if a["State"] != "DEAD"
            and (a["ActorClassName"] in ours or a["Name"].startswith("kimi-"))]


def test_a_serve_shutdown_leaves_no_actor_of_ours(app) -> None:
    """Last in this module: it shuts the app down (the fixture's close then has nothing left to stop)."""
    from ray import serve

    before = {a["ActorClassName"] for a in _our_live_actors()}
    assert before == {"StatsBoard", "_RankActor"}, before  # the board and each LM replica's second EP rank
    serve.shutdown()
    _wait_for(lambda: not _our_live_actors(), 30, "the app's actors to end with it")
