"""The app with its vision pool on the other node: answers equal transformers', everything held is
released, and every address a replica advertised is one the other node reaches."""

from __future__ import annotations

from runtime.protocol import SamplingParams
from runtime.router.prepare import RequestPreparer
from tests.e2e.test_http import body, post
from tests.integration.workload import chat, png, reference_inputs
from tests.reference import reference_greedy, reference_model

CASES = [("no picture here", []), ("what is in the picture", [png(112, 84, seed=3)]),
         ("compare them", [png(56, 56, seed=4), png(140, 70, seed=5)])]


def test_greedy_answers_equal_transformers_with_vision_on_the_other_node(app, model_dir) -> None:
    prep, ref = RequestPreparer(model_dir, "float32", trust_remote_code=False), reference_model(str(model_dir))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = app.vision_client()
    for text, images in CASES:
        response = post(app, "/v1/chat/completions", body(text, images, return_token_ids=True))
        assert response.status_code == 200, response.text
        expected, _ = reference_greedy(ref, reference_inputs(prep, chat(text, images, greedy)), 8)
        assert response.json()["choices"][0]["token_ids"] == expected, text
    stats = app.wait_drained()
    assert sum(s["cache"]["live_references"] for s in stats["vision"].values()) == 0
    assert sum(s["engine"]["kv_blocks_used"] for s in stats["lm"].values()) == 0
    grown = app.vision_client_since(before, releases=2)
    assert grown["encodes"] == 2 and grown["encode_failures"] == 0 and grown["arrival_timeouts"] == 0
    assert grown["releases_sent"] == 2 and grown["releases_dropped"] == 0


def test_each_replica_advertises_its_own_nodes_address_and_the_peer_reaches_it(app) -> None:
    stats = app.wait_drained()
    head, vision_node = app.hosts.head.address, app.hosts.vision.address
    lm_addresses = [s["address"] for s in stats["lm"].values()]
    vision_addresses = [s["address"] for s in stats["vision"].values()]
    assert lm_addresses and all(a.startswith(f"tcp://{head}:") for a in lm_addresses), lm_addresses
    assert vision_addresses and all(a.startswith(f"tcp://{vision_node}:") for a in vision_addresses)
    for address in lm_addresses:  # embeddings come from the vision node
        assert app.can_reach(address, from_vision_node=True), address
    for address in vision_addresses:  # releases come from the head
        assert app.can_reach(address, from_vision_node=False), address
