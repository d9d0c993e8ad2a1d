"""Operator limits over real HTTP: the API key, the queue limit (429 + Retry-After) and the
request timeout (504), each leaving nothing held behind."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body
from tests.integration.workload import png

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    args = {"cache_dir": str(tmp_path_factory.mktemp("limits-cache")), "api_key": KEY,
            "limits": {"max_queued_requests": 2, "request_timeout_s": 2.0, "max_image_mb": 0.05, "max_body_mb": 1.0}}
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config(args, port=port))
        yield served
    finally:
        served.close()


def _post(served, payload, key: str | None = KEY, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(f"{served.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=60, **kw)


def test_api_key_is_required(app) -> None:
    for key in (None, "wrong"):
        response = _post(app, body("hi", []), key)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{app.base_url}/v1/models", timeout=30).status_code == 401
    assert _post(app, body("hi", [])).status_code == 200


def test_oversized_image_and_body_are_refused(app) -> None:
    big_image = _post(app, body("look", [png(300, 300, seed=1)]))  # ~270 KB of PNG, over 50 KB
    assert big_image.status_code == 400 and "larger than" in big_image.json()["error"]["message"]
    huge_body = _post(app, body("x" * (2 << 20), []))
    assert huge_body.status_code == 413 and huge_body.json()["error"]["type"] == "invalid_request_error"
    assert _post(app, body("small", [png(28, 28, seed=2)])).status_code == 200


def test_queue_limit_answers_429_and_timeout_answers_504(app) -> None:
    long = body("go on", [], max_tokens=3500)
    opened = threading.Barrier(3)
    results: list[int] = []

    def hold() -> None:
        response = _post(app, {**long, "stream": True}, stream=True)
        lines = response.iter_lines()
        next(lines)  # the stream is open: this request is in flight
        opened.wait()
        results.append(response.status_code)
        for _ in lines:  # until the timeout ends it
            pass

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    opened.wait()
    refused = _post(app, body("one more", []))
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    for t in holders:
        t.join(timeout=60)

    slow = _post(app, long)  # 3500 tokens take longer than the 2 s limit
    assert slow.status_code == 504 and "timed out" in slow.json()["error"]["message"]
    stats = app.wait_drained()
    assert all(s["engine"]["kv_blocks_used"] == 0 for s in stats["lm"].values())
    assert stats["router"]["in_flight"] == 0
