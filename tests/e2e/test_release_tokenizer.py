"""A checkpoint in the official release's tokenizer format (tiktoken.model + its own tokenization_kimi.py),
served with trust_remote_code: the router and the engine process both load the checkpoint's class, and
answers over HTTP equal offline generation with the tokenizer.json checkpoint of the same weights."""

from __future__ import annotations

from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.e2e.test_http import body, post
from tests.integration.workload import png


def test_release_format_serves_with_trust_remote_code(checkpoints) -> None:
    from runtime.lm_service.offline import OfflineLLM
    from runtime.requests import parse_chat_request
    from runtime.settings import EngineConfig

    request = body("这是什么？ Describe it 👋", [png(112, 84, seed=3)], return_token_ids=True, max_tokens=10)
    standard = OfflineLLM(checkpoints("tiny"), EngineConfig(kv_cache_mb=8))
    try:
        expected = standard.generate(parse_chat_request(request, standard.defaults.sampling))
    finally:
        standard.close()
    port = free_port()
    served = ServeApp(port)
    try:
        release = str(checkpoints("tiny", tokenizer="tiktoken"))
        served.deploy(deploy_config({"model": release, "served_model_name": "tiny", "trust_remote_code": True},
                                     port=port))
        response = post(served, "/v1/chat/completions", request)
    finally:
        served.close()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["token_ids"] == expected.token_ids and len(expected.token_ids) == 10
    assert answer["usage"]["prompt_tokens"] == expected.prompt_tokens
