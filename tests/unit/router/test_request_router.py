"""The LM request router's policy: affinity by image or prefix, stable under scaling, load wins
when the favourite is busy."""

from __future__ import annotations

from runtime.protocol import GenerateRequest, ImagePayload, SamplingParams
from runtime.router.request_router import PREFIX_TOKENS, affinity_key, rank, rendezvous

PARAMS = SamplingParams()


def test_affinity_key_prefers_the_first_image_then_a_long_prefix() -> None:
    with_image = GenerateRequest("a", [1, 2, 3], PARAMS, [ImagePayload(b"", 4, "k1"), ImagePayload(b"", 4, "k2")])
    long_text = GenerateRequest("b", list(range(PREFIX_TOKENS + 10)), PARAMS)
    same_prefix = GenerateRequest("c", list(range(PREFIX_TOKENS)) + [999], PARAMS)
    assert affinity_key(with_image) == "image:k1"
    assert affinity_key(long_text) == affinity_key(same_prefix) is not None
    assert affinity_key(GenerateRequest("d", [1, 2, 3], PARAMS)) is None
    assert affinity_key(None) is None


def test_rendezvous_moves_only_the_keys_of_a_removed_replica() -> None:
    replicas = ["r1", "r2", "r3", "r4"]
    keys = [f"image:{i}" for i in range(400)]
    before = {k: rendezvous(k, replicas) for k in keys}
    assert len(set(before.values())) == 4  # keys spread over every replica
    after = {k: rendezvous(k, ["r1", "r2", "r4"]) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r3")


def test_rank_keeps_the_favourite_unless_it_is_much_busier() -> None:
    favourite = rendezvous("image:x", ["a", "b", "c"])
    idle = {"a": 0.0, "b": 0.0, "c": 0.0}
    assert rank("image:x", idle, slack=4)[0] == [favourite]
    busy = {**idle, favourite: 3.0}
    assert rank("image:x", busy, slack=4)[0] == [favourite]  # within slack: the cache is worth it
    swamped = {**idle, favourite: 9.0}
    first = rank("image:x", swamped, slack=4)
    assert first[0] != [favourite] and first[-1][-1] == favourite
    assert rank(None, {"a": 5.0, "b": 1.0, "c": 3.0}, slack=4) == [["b"], ["c", "a"]]
    assert rank("k", {}, slack=4) == []
