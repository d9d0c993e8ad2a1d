"""Property-based fuzzing of the HTTP API: arbitrary JSON bodies, near-valid bodies with one field
replaced by an arbitrary value, hostile images in data URLs, deep nesting, huge bodies, extreme
sampling values. Every answer is a 2xx or a 4xx with an OpenAI error body (never a 5xx, a hang or
a dropped connection), and afterwards the service is healthy and holds nothing."""

from __future__ import annotations

import base64
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body
from tests.integration.workload import png
from tests.reliability.test_hostile_images import SEEDS

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    port = free_port()
    served = ServeApp(port)
    args = {"cache_dir": str(tmp_path_factory.mktemp("fuzz-cache")),
            "limits": {"max_body_mb": 2.0, "request_timeout_s": 20.0}}
    try:
        served.deploy(deploy_config(args, port=port))
        yield served
    finally:
        served.close()


def _send(app, data: bytes, path: str = "/v1/chat/completions") -> requests.Response:
    return requests.post(f"{app.base_url}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=60)


def _assert_answered(response: requests.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30)

FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "seed", "stop", "stop_token_ids", "n", "stream", "stream_options", "logprobs", "top_logprobs",
          "min_tokens", "ignore_eos", "skip_special_tokens", "chat_template_kwargs", "return_token_ids", "tools"]


@FUZZ
@given(JSON)
def test_arbitrary_json_bodies(app, value) -> None:
    _assert_answered(_send(app, json.dumps(value).encode()))


@FUZZ
@given(st.sampled_from(FIELDS), JSON)
def test_valid_body_with_one_field_replaced(app, field, value) -> None:
    payload = body("hello", [png(28, 28, seed=1)], max_tokens=4)
    payload[field] = value
    _assert_answered(_send(app, json.dumps(payload).encode()))


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 4000), st.binary(max_size=64))
def test_hostile_images_in_data_urls(app, seed, cut, junk) -> None:
    data = seed[: cut % (len(seed) + 1)] + junk
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    payload = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": "what"}]}], "max_tokens": 3}
    _assert_answered(_send(app, json.dumps(payload).encode()))


@pytest.mark.parametrize("data,status", [
    (b"[" * 100_000 + b"]" * 100_000, 400),  # deep nesting
    (json.dumps(body("x" * (3 << 20), [])).encode(), 413),  # over max_body_mb
    (b"\xff\xfe not utf-8", 400),
    (json.dumps({**body("hi", []), "temperature": 1e308}).encode(), 400),
    (json.dumps({**body("hi", []), "max_tokens": 10**18}).encode(), 400),
    (json.dumps({**body("hi", []), "seed": -2**70}).encode(), 400),
    (json.dumps({**body("hi", []), "top_logprobs": 10**9, "logprobs": True}).encode(), 400),
    (json.dumps({**body("hi", []), "stop": ["a"] * 1000}).encode(), 400),
    (json.dumps(body("word " * 6000, [])).encode(), 400),  # over the context
])
def test_extreme_requests(app, data, status) -> None:
    response = _send(app, data)
    assert response.status_code == status, response.text[:300]
    _assert_answered(response)


def test_completions_endpoint_fuzz(app) -> None:
    valid = ["ok", [[1, 2], [3]]]  # a prompt, a list of two token-id prompts
    for prompt in [None, "", [], [-1], [10**9], [[1, 2], []], {"a": 1}, [True], ["a", 5], *valid]:
        response = _send(app, json.dumps({"prompt": prompt, "max_tokens": 2}).encode(), "/v1/completions")
        _assert_answered(response)
        assert response.status_code == (200 if prompt in valid else 400)


def test_service_is_healthy_and_holds_nothing_afterwards(app) -> None:
    assert requests.get(f"{app.base_url}/health", timeout=30).status_code == 200
    stats = app.wait_drained(timeout_s=30)
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0
    responses = stats["router"]["responses"]
    assert not any(int(code) >= 500 for code in responses), responses
