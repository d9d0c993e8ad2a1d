"""A slow, lossy wire between the nodes for the ZMQ traffic (embeddings one way, releases the
other): every push goes through a SOCKS5 relay in the test (`zmq_proxy`) that holds each chunk 50 ms
and cuts a connection now and then. Answers that arrive still equal transformers'; a request whose
embeddings were lost fails with a clear timeout; nothing stays held (a lost release is reclaimed
by the vision cache's lease). Runs last in the package (it redeploys every pool with the proxy)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from runtime.protocol import SamplingParams
from runtime.router.prepare import RequestPreparer
from tests.e2e.test_http import body
from tests.integration.workload import chat, png, reference_inputs
from tests.multinode.relay import LossyRelay
from tests.reference import reference_greedy, reference_model

LEASE_S = 8  # lost releases: their references go after this


@pytest.fixture
def relay(app):
    relay = LossyRelay(app.hosts.head.address, delay_s=0.05, drop_every=20)
    try:
        app.apply(app.configure({"zmq_proxy": relay.address, "vision": {"lease_s": LEASE_S}}))
        yield relay
    finally:
        relay.close()


def test_a_slow_lossy_wire_keeps_parity_and_leaks_nothing(app, model_dir, relay) -> None:
    cases = [(f"wire {i}", [png(48 + 8 * (i % 4), 56, seed=7000 + i + k) for k in range(1 + i % 2)])
             for i in range(16)]
    cases += [("wire again", cases[0][1]), ("no image", [])]

    def ask(case: tuple[str, list[bytes]]) -> requests.Response:
        return requests.post(f"{app.base_url}/v1/chat/completions", timeout=90,
                             json=body(case[0], case[1], return_token_ids=True))

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(ask, cases))
    prep, ref = RequestPreparer(model_dir, "float32", trust_remote_code=False), reference_model(str(model_dir))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outcomes = []
    for (text, images), response in zip(cases, responses, strict=True):
        if response.status_code == 200:
            expected, _ = reference_greedy(ref, reference_inputs(prep, chat(text, images, greedy)), 8)
            assert response.json()["choices"][0]["token_ids"] == expected, text
            outcomes.append(f"{text}: 200, equal")
        else:
            message = response.json()["error"]["message"]
            assert response.status_code == 504 and "did not arrive" in message, (text, response.text)
            outcomes.append(f"{text}: {response.status_code} {message}")
    print("\n" + "\n".join(outcomes) + f"\nrelay: {relay.stats}")
    assert sum(r.status_code == 200 for r in responses) >= len(cases) // 2, outcomes
    assert relay.stats.drops > 0 and relay.stats.connections > relay.stats.drops
    vision = app.hosts.vision.address
    assert any(t.startswith(f"{vision}:") for t in relay.stats.targets), "no release went through the relay"
    assert any(t.startswith(f"{app.hosts.head.address}:") for t in relay.stats.targets), "no embeddings did"

    stats = app.wait_drained(timeout_s=LEASE_S + 20)
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    for lm in stats["lm"].values():
        assert lm["engine"]["kv_blocks_used"] == 0 and lm["vision_client"]["requests"] == 0
