"""Two LM replicas with two expert-parallel ranks each (Ray actors in each replica's placement
group) and one vision replica, over HTTP: a concurrent workload succeeds on both replicas, requests
that repeat an image go to the replica that already has it, and afterwards nothing is held."""

from __future__ import annotations

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
    args = {"cache_dir": str(cache_dir), "engine": {"ep_size": 2, "cpus_per_rank": 0.25}, "vision": {"cpus": 0.25}}
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
    prep = RequestPreparer(model_dir, "float32")
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
