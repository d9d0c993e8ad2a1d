"""A second vision replica added by re-applying the YAML during traffic: it is placed on the vision
node, the requests running meanwhile finish, both replicas encode, and nothing stays held."""

from __future__ import annotations

import time

from tests.e2e.test_scaling import _long_requests, _replicas, _until_every_replica_works


def test_a_second_vision_replica_joins_on_the_vision_node_during_traffic(app) -> None:
    lm_before = set(_replicas(app, "lm", 1))
    vision_before = set(_replicas(app, "vision", 1))
    before = app.vision_client()
    pool, running = _long_requests(app, 4, seed=2100)
    time.sleep(0.5)
    app.apply(app.configure(replicas={"VisionService": 2}))
    vision_now = _replicas(app, "vision", 2)
    assert vision_before <= set(vision_now), "the first vision replica was replaced"
    assert set(_replicas(app, "lm", 1)) == lm_before, "the LM replica was restarted"
    assert all(s["address"].startswith(f"tcp://{app.hosts.vision.address}:") for s in vision_now.values())
    assert [f.result(timeout=300) for f in running] == [(200, "length")] * 4
    pool.shutdown()

    misses = _until_every_replica_works(app, "vision", lambda s: s["cache"]["misses"], seed=2200)
    assert all(m > 0 for m in misses.values()), f"a vision replica got no work: {misses}"
    stats = app.wait_drained()
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0
    grown = app.vision_client_since(before, releases=12)  # 4 long requests, then at least one burst of 8
    assert grown["encode_failures"] == 0 and grown["arrival_timeouts"] == 0 and grown["releases_dropped"] == 0
