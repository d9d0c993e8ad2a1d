"""Stop conditions of offline generation on a real tiny checkpoint."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.lm_service.generate import OfflineModel
from runtime.requests import parse_chat_request


@pytest.fixture(scope="module")
def model(checkpoints) -> OfflineModel:
    return OfflineModel(checkpoints("tiny"))


def _run(model: OfflineModel, **sampling):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, **sampling}
    return model.generate(parse_chat_request(body, model.defaults.sampling))


def test_stop_token_ids_end_the_answer(model: OfflineModel) -> None:
    free = _run(model, max_tokens=6, ignore_eos=True)
    third = free.token_ids[2]
    cut = _run(model, max_tokens=6, stop_token_ids=[third])
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[: free.token_ids.index(third) + 1]


def test_generation_config_eos_stops_unless_ignored(model: OfflineModel) -> None:
    free = _run(model, max_tokens=5, ignore_eos=True)
    patched = dataclasses.replace(model.defaults, eos_token_ids=(free.token_ids[1],))
    original, model.defaults = model.defaults, patched
    try:
        stopped = _run(model, max_tokens=5)
        ignored = _run(model, max_tokens=5, ignore_eos=True)
    finally:
        model.defaults = original
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 2
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_min_tokens_holds_back_stop_ids(model: OfflineModel) -> None:
    first = _run(model, max_tokens=1).token_ids[0]
    result = _run(model, max_tokens=4, stop_token_ids=[first], min_tokens=2)
    assert result.token_ids[0] != first and len(result.token_ids) >= 2


def test_logprobs_and_usage(model: OfflineModel) -> None:
    result = _run(model, max_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True)
    out = result.to_json()
    assert len(out["logprobs"]) == 3 and all(len(x["top"]) == 2 for x in out["logprobs"])
    assert [x["token_id"] for x in out["logprobs"]] == out["token_ids"]
    assert out["usage"]["completion_tokens"] == 3
