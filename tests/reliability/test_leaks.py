"""1,000 mixed requests through the Serve app over HTTP: streaming and not, clients that leave
mid-stream, bad inputs. Afterwards nothing is referenced or allocated, no response was a 5xx, and
each replica's resident memory is within a stated bound of its level after warm-up."""

from __future__ import annotations

import itertools
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body
from tests.integration.workload import png

TOTAL, WARMUP, CONCURRENCY = 1000, 100, 8
RSS_BOUND = 96 * 2**20  # growth allowed after warm-up: allocator noise, not per-request state


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config({"cache_dir": str(tmp_path_factory.mktemp("leak-cache")),
                                     "vision": {"cache_mb": 0.01}}, port=port))  # 10 KB: evictions happen
        yield served
    finally:
        served.close()


IMAGES = [png(28 + 14 * (i % 5), 28 + 14 * (i % 3), seed=3000 + i) for i in range(40)]


def _request(served, i: int) -> tuple[str, int]:
    rng = random.Random(i)
    kind = rng.choices(["whole", "stream", "leave", "bad"], weights=[55, 30, 8, 7])[0]
    images = [rng.choice(IMAGES)] if rng.random() < 0.6 else []
    payload = body(f"request {i} " + "word " * rng.randint(1, 30), images, max_tokens=rng.randint(2, 6))
    url = f"{served.base_url}/v1/chat/completions"
    if kind == "bad":
        payload = rng.choice([{"messages": "nope"}, {**payload, "temperature": 9}, body("x", [b"not an image"])])
        return kind, requests.post(url, json=payload, timeout=120).status_code
    if kind == "whole":
        return kind, requests.post(url, json=payload, timeout=120).status_code
    payload = {**payload, "stream": True, "max_tokens": 400 if kind == "leave" else payload["max_tokens"]}
    with requests.post(url, json=payload, timeout=120, stream=True) as response:
        lines = response.iter_lines()
        for _ in range(3 if kind == "leave" else 10**6):
            if next(lines, None) is None:
                break
        return kind, response.status_code  # leaving the block closes the connection mid-stream


def _rss(stats: dict) -> dict[str, int]:
    return {f"{pool}:{r}": s["rss_bytes"] for pool in ("lm", "vision") for r, s in stats[pool].items()}


def test_a_thousand_mixed_requests_leave_nothing_behind(app) -> None:
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        warm = list(pool.map(lambda i: _request(app, i), range(WARMUP)))
        baseline = _rss(app.wait_drained())
        rest = list(pool.map(lambda i: _request(app, i), range(WARMUP, TOTAL)))
    outcomes = warm + rest
    assert len(outcomes) == TOTAL
    assert all(status < 500 for _, status in outcomes), f"a 5xx answer: {[o for o in outcomes if o[1] >= 500]}"
    assert all(status == 200 for kind, status in outcomes if kind != "bad")
    assert all(status == 400 for kind, status in outcomes if kind == "bad")

    stats = app.wait_drained(timeout_s=30)
    vision = list(stats["vision"].values())
    lm = list(stats["lm"].values())
    assert sum(s["cache"]["live_references"] for s in vision) == 0
    assert all(s["cache"]["bytes"] <= s["cache"]["budget_bytes"] for s in vision)
    assert sum(s["cache"]["evictions"] for s in vision) > 0
    assert sum(s["engine"]["kv_blocks_used"] + s["engine"]["running"] + s["engine"]["waiting"] for s in lm) == 0
    assert sum(s["vision_client"]["requests"] for s in lm) == 0 and stats["router"]["in_flight"] == 0
    after = _rss(stats)
    grown = {k: after[k] - baseline[k] for k in baseline if k in after}
    assert grown and all(g < RSS_BOUND for g in grown.values()), f"resident memory grew: {grown}"
    print(f"\n{TOTAL} requests; RSS after warm-up {baseline}; growth {grown}")


def test_bounded_soak_has_no_5xx(app) -> None:
    """KIMI_SOAK_S seconds (30 in CI; the issue's 2 minutes with KIMI_SOAK_S=120) of continuous
    mixed traffic at the concurrency above: zero 5xx, and everything drains afterwards."""
    seconds = float(os.environ.get("KIMI_SOAK_S", "30"))
    deadline = time.monotonic() + seconds
    counter = itertools.count(TOTAL)

    def worker() -> list[tuple[str, int]]:
        done = []
        while time.monotonic() < deadline:
            done.append(_request(app, next(counter)))
        return done

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = [o for batch in pool.map(lambda _: worker(), range(CONCURRENCY)) for o in batch]
    assert len(outcomes) > CONCURRENCY
    assert all(status < 500 for _, status in outcomes), f"5xx answers: {[o for o in outcomes if o[1] >= 500]}"
    stats = app.wait_drained(timeout_s=30)
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0
    print(f"\nsoak: {len(outcomes)} requests in {seconds:.0f} s, none 5xx")
