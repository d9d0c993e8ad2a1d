"""SGLang's /generate and the admin endpoints on the app from deploy/local.yaml (admin on, an API
key), over real HTTP: /generate equals transformers; sleep and wake under traffic leak nothing and
hang nothing, and requests during sleep get 503; abort ends requests in flight; a weight update
serves checkpoint B as transformers does, and a checkpoint that does not fit is refused with the
old weights serving on."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from runtime.checkpoint.maker import make_checkpoint
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.reference import reference_greedy, reference_model

KEY = "sk-admin-test"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
IDS = [5, 17, 23, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("admin-app")
    a = make_checkpoint(root / "a", "tiny", seed=0)
    b = make_checkpoint(root / "b", "tiny", seed=1)
    odd = make_checkpoint(root / "odd", "odd", seed=0)
    port = free_port()
    served = ServeApp(port)
    try:
        # Two LM replicas: every admin call must reach each of them (runtime.router.admin).
        served.deploy(deploy_config({"model": str(a), "api_key": KEY, "admin": {"enabled": True}},
                                    replicas={"LMService": 2}, port=port))
        yield served, a, b, odd
    finally:
        served.close()


def post(app, path: str, payload: dict | None = None, headers: dict | None = None, **kw) -> requests.Response:
    return requests.post(f"{app.base_url}{path}", data=json.dumps(payload or {}),
                         headers=AUTH if headers is None else headers, timeout=300, **kw)


def greedy(ids: list[int], n: int = 6, **extra) -> dict:
    return {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}, **extra}


def expected(model_dir, ids: list[int], n: int = 6) -> list[int]:
    return reference_greedy(reference_model(str(model_dir)), {"input_ids": torch.tensor([ids])}, n)[0]


def sse(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_generate_speaks_sglang(app) -> None:
    served, a, _, _ = app
    want = expected(a, IDS)
    response = post(served, "/generate", greedy(IDS, return_logprob=True, rid="g1"))
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["output_ids"] == want and response.headers["x-weights-version"] == "0"
    meta = out["meta_info"]
    assert meta["id"] == "g1" and meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == len(IDS) and meta["completion_tokens"] == 6 and meta["weight_version"] == "0"
    assert [t for _, t, _ in meta["output_token_logprobs"]] == want
    assert all(lp <= 0 and text is None for lp, _, text in meta["output_token_logprobs"])
    many = post(served, "/generate", greedy(IDS, sampling_params={"temperature": 0, "max_new_tokens": 6,
                                                                  "ignore_eos": True, "n": 2})).json()
    assert [o["output_ids"] for o in many] == [want, want]
    text = post(served, "/generate", {"text": ["the quick", "brown fox"], "sampling_params": {"max_new_tokens": 3}})
    assert [o["meta_info"]["completion_tokens"] for o in text.json()] == [3, 3]
    events = sse(post(served, "/generate", greedy(IDS, stream=True), stream=True))
    assert events[-1] == "[DONE]" and events[-2]["output_ids"] == want
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "length"
    routed = post(served, "/generate", greedy(IDS, return_routed_experts=True)).json()["meta_info"]["routed_experts"]
    assert routed["dtype"] == "int16" and routed["shape"][0] == len(IDS) + 6 - 1  # every token but the last
    assert "routed_experts" not in meta
    for payload, field in (({"input_ids": IDS, "bogus": 1}, "bogus"),
                           ({"input_ids": IDS, "sampling_params": {"best_of": 2}}, "sampling_params.best_of"),
                           ({"text": "hi", "input_ids": IDS}, "text")):
        refused = post(served, "/generate", payload)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field


def test_admin_needs_the_key(app) -> None:
    served = app[0]
    for headers in ({"Content-Type": "application/json"}, {"Authorization": "Bearer wrong"}):
        refused = post(served, "/admin/wake", {}, headers=headers)
        assert refused.status_code == 403 and "API key" in refused.json()["error"]["message"]
    assert post(served, "/admin/sleep", {"level": 3}).status_code == 400
    assert post(served, "/admin/sleep", {"mode": "later"}).json()["error"]["param"] == "mode"


def traffic(served, stop: threading.Event, seen: list) -> None:
    """Greedy /generate requests back to back until stopped; each status code (or the error) recorded."""
    while not stop.is_set():
        try:
            seen.append(post(served, "/generate", greedy(IDS, 12)).status_code)
        except requests.RequestException as e:  # a hang would show up here (timeout)
            seen.append(repr(e))


def held(stats: dict) -> int:
    lm = sum(s["engine"]["kv_blocks_used"] + s["engine"]["running"] + s["engine"]["waiting"]
             + s["vision_client"]["requests"] for s in stats["lm"].values())
    return lm + sum(s["cache"]["live_references"] for s in stats["vision"].values())


def eventually(check, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_sleep_and_wake_under_traffic(app) -> None:
    served, a, _, _ = app
    stop, seen = threading.Event(), []
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(traffic, served, stop, seen)
        try:
            for level, mode in ((1, "drain"), (2, "abort"), (1, "abort")):
                time.sleep(0.5)
                started = time.perf_counter()
                slept = post(served, "/admin/sleep", {"level": level, "mode": mode})
                assert slept.status_code == 200, slept.text
                assert all(r["sleep_level"] == level for r in slept.json()["replicas"])
                during = post(served, "/generate", greedy(IDS))
                assert during.status_code == 503 and during.headers["Retry-After"]
                assert eventually(lambda level=level: all(s["engine"]["sleep_level"] == level  # every 0.25 s
                                              for s in served.stats()["lm"].values()))
                woke = post(served, "/admin/wake")
                assert woke.status_code == 200, woke.text
                print(f"sleep level {level} ({mode}) + wake: {time.perf_counter() - started:.3f} s "
                      f"(wake {woke.json()['seconds']:.3f} s)")
        finally:
            stop.set()
    assert set(seen) <= {200, 503}, seen
    assert seen.count(200) > 3
    assert held(served.wait_drained()) == 0
    assert post(served, "/generate", greedy(IDS)).json()["output_ids"] == expected(a, IDS)


def test_abort_ends_requests_in_flight(app) -> None:
    served = app[0]
    body = {"input_ids": IDS, "rid": "long-one", "stream": True,
            "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    response = post(served, "/generate", body, stream=True)
    lines = response.iter_lines()
    assert any(next(lines).startswith(b"data: ") for _ in range(4))
    aborted = post(served, "/admin/abort", {"rid": "long-one"})
    assert aborted.status_code == 200 and sum(r["aborted"] for r in aborted.json()["replicas"]) == 1
    events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert held(served.wait_drained()) == 0


def test_update_weights_serves_b_and_refuses_what_does_not_fit(app, tmp_path) -> None:
    served, a, b, odd = app
    want_a, want_b = expected(a, IDS), expected(b, IDS)
    assert want_a != want_b
    for path, says in ((odd, "another model"), (tmp_path / "nowhere", "nowhere")):
        refused = post(served, "/admin/update_weights", {"path": str(path)})
        assert refused.status_code == 400 and says in refused.json()["error"]["message"], refused.text
        still = post(served, "/generate", greedy(IDS))
        assert still.json()["output_ids"] == want_a and still.headers["x-weights-version"] == "0"
    started = time.perf_counter()
    updated = post(served, "/admin/update_weights", {"path": str(b), "mode": "drain"})
    assert updated.status_code == 200, updated.text
    print(f"update_weights: {time.perf_counter() - started:.3f} s over HTTP, "
          f"{max(r['seconds'] for r in updated.json()['replicas']):.3f} s in the engine")
    assert updated.json()["weights_version"] == 1 and len(updated.json()["replicas"]) == 2
    deadline = time.monotonic() + 10  # the replicas' stats reach the board every half second or so
    while (versions := [s["engine"]["weights_version"] for s in served.stats()["lm"].values()]) != [1, 1]:
        assert time.monotonic() < deadline, f"LM replicas' weights versions: {versions}"  # both must serve B
        time.sleep(0.2)
    answer = post(served, "/generate", greedy(IDS))
    assert answer.json()["output_ids"] == want_b and answer.headers["x-weights-version"] == "1"
    assert answer.json()["meta_info"]["weight_version"] == "1"
    chat = post(served, "/v1/completions", {"prompt": IDS, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                            "return_token_ids": True})
    assert chat.json()["choices"][0]["token_ids"] == want_b and chat.headers["x-weights-version"] == "1"
