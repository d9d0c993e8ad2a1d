"""Stop conditions of offline generation (engine + local vision) on a real tiny checkpoint."""

from __future__ import annotations

import pytest

from runtime.lm_service.engine import EngineConfig
from runtime.lm_service.offline import OfflineLLM
from runtime.requests import parse_chat_request


@pytest.fixture(scope="module")
def model(checkpoints) -> OfflineLLM:
    return OfflineLLM(checkpoints("tiny"), EngineConfig(kv_cache_bytes=8 << 20))


def _run(model: OfflineLLM, **sampling):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0, **sampling}
    return model.generate(parse_chat_request(body, model.defaults.sampling))


def test_stop_token_ids_end_the_answer(model: OfflineLLM) -> None:
    free = _run(model, max_tokens=6, ignore_eos=True)
    third = free.token_ids[2]
    cut = _run(model, max_tokens=6, stop_token_ids=[third])
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[: free.token_ids.index(third) + 1]


def test_generation_config_eos_stops_unless_ignored(model: OfflineLLM) -> None:
    free = _run(model, max_tokens=5, ignore_eos=True)
    original, model.engine.eos_token_ids = model.engine.eos_token_ids, (free.token_ids[1],)
    try:
        stopped = _run(model, max_tokens=5)
        ignored = _run(model, max_tokens=5, ignore_eos=True)
    finally:
        model.engine.eos_token_ids = original
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 2
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_min_tokens_holds_back_stop_ids(model: OfflineLLM) -> None:
    first = _run(model, max_tokens=1).token_ids[0]
    result = _run(model, max_tokens=4, stop_token_ids=[first], min_tokens=2)
    assert result.token_ids[0] != first and len(result.token_ids) >= 2


def test_logprobs_and_usage(model: OfflineLLM) -> None:
    result = _run(model, max_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True)
    out = result.to_json()
    assert len(out["logprobs"]) == 3 and all(len(x["top"]) == 2 for x in out["logprobs"])
    assert [x["token_id"] for x in out["logprobs"]] == out["token_ids"]
    assert out["usage"]["completion_tokens"] == 3
