"""The vision node lost with requests in flight: the wire cut (veth down), then its raylet killed.
Requests that needed it end with a clear error within the request timeout, none hangs, text-only
requests go on, the LM replica releases what every request held, and once the node is back (link
up, a fresh `ray start`) and Serve has placed a vision replica there again, image requests succeed
and equal transformers'. What happened to each request is printed (`pytest -s`)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import requests

from runtime.protocol import SamplingParams
from runtime.router.prepare import RequestPreparer
from tests.e2e.test_http import body
from tests.integration.workload import chat, png, reference_inputs
from tests.multinode.conftest import TEST_ARGS
from tests.reference import reference_greedy, reference_model

REQUEST_TIMEOUT_S = TEST_ARGS["limits"]["request_timeout_s"]
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 30  # a request still open by then hangs
OUTAGE_S = 20  # traffic while the node is gone


@dataclass
class Outcome:
    index: int
    images: int
    sent_at: float  # time.monotonic()
    status: int | None
    seconds: float
    message: str

    def line(self, cut_at: float) -> str:
        return (f"#{self.index:02d} {self.images} image(s) sent at {self.sent_at - cut_at:+6.2f} s: {self.status} "
                f"after {self.seconds:5.2f} s {self.message}")


class Traffic:
    """Requests sent from threads at a steady pace, each with its own image (a cache miss)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.pool = ThreadPoolExecutor(12)
        self.futures: list[Future[Outcome]] = []

    def send(self, images: int, max_tokens: int = 16) -> None:
        index = len(self.futures)
        payload = body(f"request {index}", [png(64 + 8 * (index % 5), 64, seed=5000 + index) for _ in range(images)],
                       max_tokens=max_tokens)
        self.futures.append(self.pool.submit(self._one, index, images, payload))

    def _one(self, index: int, images: int, payload: dict) -> Outcome:
        start = time.monotonic()
        try:
            response = requests.post(f"{self.base_url}/v1/chat/completions", json=payload, timeout=CLIENT_TIMEOUT_S)
            status = response.status_code
            message = "" if status == 200 else response.json()["error"]["message"]
        except requests.RequestException as e:
            status, message = None, f"client gave up: {type(e).__name__}"
        return Outcome(index, images, start, status, time.monotonic() - start, message[:160])

    def results(self) -> list[Outcome]:
        outcomes = [f.result(timeout=CLIENT_TIMEOUT_S + 10) for f in self.futures]
        self.pool.shutdown()
        return outcomes


def _until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not after {timeout_s} s"
        time.sleep(0.5)


def _vision_replicas(app) -> dict:
    try:
        return app.stats()["vision"]
    except (requests.RequestException, ValueError, KeyError):
        return {}


def test_losing_the_vision_node_fails_only_what_needed_it_and_nothing_stays_held(app, model_dir) -> None:
    hosts = app.hosts
    old_vision = set(_vision_replicas(app))
    assert old_vision
    traffic = Traffic(app.base_url)
    for i in range(3):  # decoding when the wire goes (their embeddings arrived, their releases will not)
        traffic.send(images=1 + i % 2, max_tokens=1500)
    time.sleep(0.5)
    for _ in range(3):  # asking the vision pool when the wire goes
        traffic.send(images=2, max_tokens=8)
    cut_at = time.monotonic()
    hosts.link(up=False)
    raylet = hosts.vision.raylet_pid()
    assert raylet is not None
    hosts.vision.kill_pid(raylet)
    stop = threading.Event()
    deadline = time.monotonic() + OUTAGE_S
    while time.monotonic() < deadline:  # during the outage: an image request and a text one per second
        traffic.send(images=1)
        traffic.send(images=0)
        stop.wait(1.0)
    during = traffic.results()

    killed = hosts.vision.kill()  # whatever of the node outlived its raylet
    hosts.link(up=True)
    hosts.start_vision_node()
    _until(lambda: bool(set(_vision_replicas(app)) - old_vision), 180, "a new vision replica")
    app.deploy(app.config)  # waits until Serve reports the app running and /health answers 200

    print(f"\nvision node cut at 0.00 s (raylet {raylet}; {len(killed)} more of its processes ended after)")
    for outcome in during:
        print(outcome.line(cut_at))
    for outcome in during:
        line = outcome.line(cut_at)
        assert outcome.status is not None, f"hung: {line}"
        assert outcome.seconds <= REQUEST_TIMEOUT_S + 5, line
        if outcome.images == 0:
            assert outcome.status == 200, line  # the LM pool is on the head: text goes on
        elif outcome.status != 200:
            assert outcome.status in (500, 504) and ("vision" in outcome.message or "timed out" in outcome.message
                                                     or "embeddings" in outcome.message), line
    assert any(o.images and o.status != 200 for o in during), "the outage failed no image request"

    image = png(96, 72, seed=77)
    response = requests.post(f"{app.base_url}/v1/chat/completions", timeout=120,
                             json=body("after the outage", [image], return_token_ids=True))
    assert response.status_code == 200, response.text
    prep = RequestPreparer(model_dir, "float32", trust_remote_code=False)
    request = chat("after the outage", [image], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    expected, _ = reference_greedy(reference_model(str(model_dir)), reference_inputs(prep, request), 8)
    assert response.json()["choices"][0]["token_ids"] == expected

    stats = app.wait_drained()
    for lm in stats["lm"].values():
        assert lm["engine"]["kv_blocks_used"] == 0 and lm["engine"]["running"] == 0, lm["engine"]
        assert lm["vision_client"]["requests"] == 0, lm["vision_client"]
    assert set(stats["vision"]).isdisjoint(old_vision)
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert all(s["address"].startswith(f"tcp://{hosts.vision.address}:") for s in stats["vision"].values())
