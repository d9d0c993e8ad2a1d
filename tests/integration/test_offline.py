"""Stop conditions of offline generation (engine + local vision) on a real tiny checkpoint."""

from __future__ import annotations

import pytest

from runtime.cli import sample_image_data_url
from runtime.errors import RemoteCodeRefusedError
from runtime.lm_service.offline import OfflineLLM
from runtime.requests import parse_chat_request
from runtime.settings import EngineConfig


@pytest.fixture(scope="module")
def model(checkpoints) -> OfflineLLM:
    return OfflineLLM(checkpoints("tiny"), EngineConfig(kv_cache_mb=8))


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


def test_release_tokenizer_generates_what_the_standard_one_does(checkpoints, model: OfflineLLM) -> None:
    """A checkpoint in the release's tokenizer format (tiktoken.model + its own class, trusted) runs end to end
    with an image. Its vocabulary maps like the standard one's and the weights are the same, so the prompt ids,
    the greedy ids and the text agree."""
    release = OfflineLLM(checkpoints("tiny", tokenizer="tiktoken"),
                         EngineConfig(kv_cache_mb=8, trust_remote_code=True))
    image = {"type": "image_url", "image_url": {"url": sample_image_data_url()}}
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "Describe the image in one "
                                                                                      "sentence."}]}],
            "max_tokens": 12, "temperature": 0, "ignore_eos": True, "skip_special_tokens": False}
    try:
        ours = release.generate(parse_chat_request(body, release.defaults.sampling))
    finally:
        release.close()
    theirs = model.generate(parse_chat_request(body, model.defaults.sampling))
    assert type(release.tokenizer).__name__ == "TikTokenTokenizer"
    assert ours.prompt_tokens == theirs.prompt_tokens > 12 and ours.finish_reason == "length"
    assert ours.token_ids == theirs.token_ids and ours.text == theirs.text


def test_release_tokenizer_without_trust_is_refused_before_the_weights(checkpoints, monkeypatch) -> None:
    import runtime.lm_service.loading as loading

    monkeypatch.setattr(loading, "load_language_model", _never)
    with pytest.raises(RemoteCodeRefusedError, match="--trust-remote-code"):
        OfflineLLM(checkpoints("tiny", tokenizer="tiktoken"), EngineConfig(kv_cache_mb=8))


def _never(*args, **kwargs):
    raise AssertionError("the weights were loaded")
