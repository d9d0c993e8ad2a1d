"""The app from deploy/local.yaml on a local Ray cluster, spoken to over real HTTP (and with the
openai client): answers equal transformers', streams equal whole answers, bad input gets its 4xx,
and a client that leaves frees everything its request held."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import requests
import torch

from runtime.checkpoint.maker import make_checkpoint
from runtime.protocol import SamplingParams
from runtime.router.prepare import RequestPreparer
from tests.e2e.serve_app import ServeApp, deploy_config, free_port
from tests.integration.workload import chat, png, reference_inputs
from tests.reference import reference_greedy, reference_model, reference_routing


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # Served by its path, as vLLM names a model: requests may say the path or the folder ("tiny").
    model_dir = make_checkpoint(tmp_path_factory.mktemp("app-cache") / "tiny", "tiny", seed=0)
    port = free_port()
    served = ServeApp(port)
    try:
        served.deploy(deploy_config({"model": str(model_dir)}, port=port))
        yield served, model_dir
    finally:
        served.close()


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def body(text: str, images: list[bytes], **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    parts.append({"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": parts}], "temperature": 0,
            "max_tokens": 8, "ignore_eos": True, **extra}


def post(app, path: str, payload, **kw) -> requests.Response:
    data = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    return requests.post(f"{app.base_url}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=120, **kw)


def stream_events(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[len(b"data: "):].decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_chat_with_images_equals_transformers(app) -> None:
    served, model_dir = app
    prep, ref = RequestPreparer(model_dir, "float32", trust_remote_code=False), reference_model(str(model_dir))
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cases = [("what is in the picture", [png(112, 84, seed=3)]), ("compare them", [png(56, 56, seed=4),
                                                                                  png(140, 70, seed=5)]),
             ("no picture here", [])]
    for text, images in cases:
        response = post(served, "/v1/chat/completions", body(text, images, return_token_ids=True))
        assert response.status_code == 200, response.text
        answer = response.json()
        inputs = reference_inputs(prep, chat(text, images, greedy))
        expected, _ = reference_greedy(ref, inputs, 8)
        assert answer["choices"][0]["token_ids"] == expected
        assert answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["finish_reason"] == "length"
        assert answer["prompt_token_ids"] == inputs["input_ids"][0].tolist()


def test_stream_equals_whole_answer(app) -> None:
    served, _ = app
    request = body("tell me about it", [png(84, 84, seed=8)], max_tokens=12)
    whole = post(served, "/v1/chat/completions", request).json()["choices"][0]
    response = post(served, "/v1/chat/completions", {**request, "stream": True,
                                                     "stream_options": {"include_usage": True}}, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = stream_events(response)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 12
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0]["role"] == "assistant"
    content = "".join(d.get("content") or "" for d in deltas)
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    assert content == (whole["message"]["content"] or "")
    assert reasoning == (whole["message"].get("reasoning_content") or "")
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_openai_client_works_unchanged(app) -> None:
    served, model_dir = app
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [str(model_dir)]
    messages = body("hello", [png(70, 70, seed=9)])["messages"]
    extra = {"top_k": 1, "ignore_eos": True, "return_token_ids": True}
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, extra_body=extra)
    assert answer.usage.completion_tokens == 6 and answer.choices[0].finish_reason == "length"
    pieces = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True,
                                            extra_body=extra)
    streamed = [c for c in pieces if c.choices]
    assert sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in streamed) == 6
    assert answer.choices[0].model_extra["token_ids"] == [t for c in streamed
                                                          for t in c.choices[0].model_extra.get("token_ids") or []]
    completion = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=5,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 5 and completion.choices[0].finish_reason == "length"


BAD = [
    ("not json", b"{nope", 400, None),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("bad part", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0].type"),
    ("not an image", body("hi", [b"this is text"]), 400, "messages"),
    ("bad base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("http url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, 400,
     "messages[0].content[0].image_url.url"),
    ("too many images", body("hi", [png(28, 28, seed=1)] * 17), 400, None),
    ("too long", body("word " * 5000, []), 400, "messages"),
    ("bad temperature", body("hi", [], temperature=-1), 400, "temperature"),
    ("bad top_p", body("hi", [], top_p=0), 400, "top_p"),
    ("bad max_tokens", body("hi", [], max_tokens=0), 400, "max_tokens"),
    ("n=0", body("hi", [], n=0), 400, "n"),
    ("unsupported field", body("hi", [], logit_bias={"5": 1}), 400, "logit_bias"),
    ("bad stream", body("hi", [], stream="yes"), 400, "stream"),
]


@pytest.mark.parametrize("name,payload,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(app, name, payload, status, param) -> None:
    served, _ = app
    response = post(served, "/v1/chat/completions", payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_client_leaving_mid_stream_frees_its_request(app) -> None:
    served, _ = app
    request = body("go on for a while", [png(98, 98, seed=12)], max_tokens=2000, stream=True)
    response = post(served, "/v1/chat/completions", request, stream=True)
    lines = response.iter_lines()
    seen = [next(lines) for _ in range(6)]  # some tokens are flowing
    assert any(line.startswith(b"data: ") for line in seen)
    response.close()  # the client goes away
    stats = served.wait_drained()
    assert all(s["cache"]["live_references"] == 0 for s in stats["vision"].values())
    assert all(s["engine"]["kv_blocks_used"] == 0 and s["engine"]["running"] == 0 for s in stats["lm"].values())
    generated = sum(s["engine"]["generated_tokens"] for s in stats["lm"].values())
    assert generated < 1500, "the request ran on after its client left"


def test_models_health_metrics(app) -> None:
    served, _ = app
    assert requests.get(f"{served.base_url}/health", timeout=30).json() == {"status": "ok"}
    metrics = requests.get(f"{served.base_url}/metrics", timeout=30).text
    for name in ("kimi_requests_total", "kimi_ttft_s_bucket", "kimi_lm_kv_blocks_used",
                 "kimi_vision_cache_live_references", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:time_per_output_token_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:prefix_cache_hits_total"):
        assert name in metrics
    generated = next(line for line in metrics.splitlines() if line.startswith("vllm:generation_tokens_total"))
    assert 'model_name="' in generated and float(generated.rsplit(" ", 1)[1]) > 0
    stats = served.stats()
    assert len(stats["lm"]) == 1 and len(stats["vision"]) == 1


def test_logprobs_stop_and_completions_with_token_ids(app) -> None:
    served, model_dir = app
    answer = post(served, "/v1/chat/completions", body("hi", [], logprobs=True, top_logprobs=3,
                                                       return_token_ids=True)).json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 8 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["logprob"] <= 0 and c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6 for c in content)

    prep = RequestPreparer(model_dir, "float32", trust_remote_code=False)
    ids = prep.tokenizer("the quick brown fox")["input_ids"]
    by_ids = post(served, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                              "logprobs": 2, "return_token_ids": True}).json()
    by_text = post(served, "/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 6, "temperature": 0,
                                               "ignore_eos": True}).json()
    choice = by_ids["choices"][0]
    assert by_ids["prompt_token_ids"] == ids and len(choice["token_ids"]) == 6
    assert choice["text"] == by_text["choices"][0]["text"]
    assert len(choice["logprobs"]["tokens"]) == 6 and all(len(t) == 2 for t in choice["logprobs"]["top_logprobs"])

    text = choice["text"]
    if len(text) > 2:  # stop at a piece of the greedy answer: the answer ends before it
        stop = text[1:3]
        stopped = post(served, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                   "ignore_eos": True, "stop": [stop]}).json()["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["text"] == text[:text.index(stop)]


def test_bench_serve_against_the_app(app, tmp_path) -> None:
    from runtime.benchmark.serve_bench import run_benchmark
    from runtime.benchmark.workload import WorkloadSpec

    served, _ = app
    spec = WorkloadSpec(num_requests=8, input_len=20, output_len=6, image_width=56, image_height=56, image_reuse=0.5)
    summary, results = run_benchmark(served.base_url, spec, concurrency=4)
    assert summary["completed"] == 8 and summary["output_tokens"] == 48
    # The server may merge tokens after the first into one chunk (engine.stream_interval_ms), so a
    # 6-token stream arrives in 1 to 6 chunks: every gap between two chunks is one ITL sample.
    for r in results:
        assert r.ttft_s > 0 and r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
        assert 1 <= r.text_chunks <= r.output_tokens == 6 and len(r.itl_s) == r.text_chunks - 1


def test_the_router_replica_answers_directly_as_through_the_proxy(app) -> None:
    # Serve's throughput-optimized mode (launch.ray_environment): the Router replica serves HTTP on
    # the configured port + 1 itself, with the same answers as through the proxy.
    served, _ = app
    direct = served.base_url.rsplit(":", 1)[0] + f":{served.port + 1}"
    request = body("hello there", [], max_tokens=6)
    via_proxy = post(served, "/v1/chat/completions", request).json()
    answer = requests.post(f"{direct}/v1/chat/completions", json=request, timeout=60).json()
    assert answer["choices"][0]["message"] == via_proxy["choices"][0]["message"]
    for key in ("prompt_tokens", "completion_tokens"):  # the second one hits the prefix cache
        assert answer["usage"][key] == via_proxy["usage"][key]


def test_model_is_named_by_path_or_folder_and_unknown_ones_get_404(app) -> None:
    served, model_dir = app
    base = served.base_url
    for name in (str(model_dir), "tiny"):
        assert requests.get(f"{base}/v1/models/{name}", timeout=30).json()["id"] == name
        assert post(served, "/v1/chat/completions", {**body("hi", []), "model": name}).status_code == 200
    for response in (requests.get(f"{base}/v1/models/gpt-9", timeout=30),
                     post(served, "/v1/chat/completions", {**body("hi", []), "model": "gpt-9"})):
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    unknown = requests.get(f"{base}/v1/nothing-here", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == 404


def test_echo_scores_the_prompt_as_transformers_does(app) -> None:
    """lm-eval's loglikelihood request: echo, logprobs 1, max_tokens 0 or 1; and prompt lists."""
    import torch

    served, model_dir = app
    prep, ref = RequestPreparer(model_dir, "float32", trust_remote_code=False), reference_model(str(model_dir))
    text = "the quick brown fox jumps over the lazy dog"
    ids = prep.tokenizer(text)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    for prompt, max_tokens in ((ids, 1), (text, 0)):
        answer = post(served, "/v1/completions", {"model": str(model_dir), "prompt": prompt, "echo": True,
                                                  "logprobs": 1, "max_tokens": max_tokens, "temperature": 0})
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith(text) and len(lp["tokens"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for pos in range(1, len(ids)):
            assert abs(lp["token_logprobs"][pos] - float(expected[pos - 1, ids[pos]])) < 1e-4
            assert len(lp["top_logprobs"][pos]) == 1
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    batch = post(served, "/v1/completions", {"prompt": [text, ids[:4]], "max_tokens": 3, "temperature": 0,
                                             "ignore_eos": True}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    alone = post(served, "/v1/completions", {"prompt": ids[:4], "max_tokens": 3, "temperature": 0,
                                             "ignore_eos": True}).json()
    assert batch["choices"][1]["text"] == alone["choices"][0]["text"]
    assert batch["usage"]["prompt_tokens"] == len(ids) + 4 and batch["usage"]["completion_tokens"] == 6


def test_n_choices_whole_and_streamed(app) -> None:
    served, _ = app
    greedy = post(served, "/v1/chat/completions", body("hello", [], max_tokens=5)).json()
    four = post(served, "/v1/chat/completions", body("hello", [], max_tokens=5, n=4)).json()
    assert [c["index"] for c in four["choices"]] == [0, 1, 2, 3]
    assert all(c["message"] == greedy["choices"][0]["message"] for c in four["choices"])
    assert four["usage"]["completion_tokens"] == 20
    assert four["usage"]["prompt_tokens"] == greedy["usage"]["prompt_tokens"]

    sampled = body("hello", [png(56, 56, seed=2)], max_tokens=6, n=3, temperature=1.0, seed=7)
    whole = post(served, "/v1/chat/completions", sampled).json()
    events = stream_events(post(served, "/v1/chat/completions", {**sampled, "stream": True,
                                                                 "stream_options": {"include_usage": True}},
                                stream=True))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 18
    for choice in whole["choices"]:
        deltas = [e["choices"][0]["delta"] for e in events[:-2] if e["choices"][0]["index"] == choice["index"]]
        assert deltas[0]["role"] == "assistant"
        streamed = "".join((d.get("reasoning_content") or "") + (d.get("content") or "") for d in deltas)
        message = choice["message"]
        assert streamed == (message.get("reasoning_content") or "") + (message["content"] or "")


def _routing(field: dict) -> np.ndarray:
    assert field["dtype"] == "int16"
    return np.frombuffer(base64.b64decode(field["data"]), "<i2").reshape(field["shape"])


def test_routed_experts_whole_and_streamed_equal_transformers_gate(app) -> None:
    """Every token that passed through the model: the prompt, then every generated token but the last."""
    served, model_dir = app
    request = body("route me", [png(56, 84, seed=9)], max_tokens=6, return_routed_experts=True,
                   return_token_ids=True)
    whole = post(served, "/v1/chat/completions", request).json()
    choice, prompt_ids = whole["choices"][0], whole["prompt_token_ids"]
    routing = _routing(choice["routed_experts"])
    assert routing.shape == (len(prompt_ids) + 6 - 1, 2, 2)  # tiny: layers 1 and 2 are MoE, k = 2
    events = stream_events(post(served, "/v1/chat/completions", {**request, "stream": True}, stream=True))
    carrying = [e for e in events[:-1] if "routed_experts" in e["choices"][0]]
    assert len(carrying) == 1 and carrying[0] is events[-2], "the final chunk alone carries them"
    assert carrying[0]["choices"][0]["finish_reason"] == "length"
    assert (_routing(carrying[0]["choices"][0]["routed_experts"]) == routing).all()
    inputs = reference_inputs(RequestPreparer(model_dir, "float32", trust_remote_code=False),
                              chat("route me", [png(56, 84, seed=9)], SamplingParams()))
    inputs["input_ids"] = torch.tensor([prompt_ids + choice["token_ids"][:-1]])
    assert (reference_routing(reference_model(str(model_dir)), inputs).numpy() == routing).all()
    completion = post(served, "/v1/completions", {"model": "tiny", "prompt": "route me", "max_tokens": 3,
                                                  "return_routed_experts": True}).json()["choices"][0]
    assert _routing(completion["routed_experts"]).shape[1:] == (2, 2)
    plain = post(served, "/v1/chat/completions", body("route me", [], max_tokens=2)).json()["choices"][0]
    assert "routed_experts" not in plain


def test_tokenize_detokenize_version(app) -> None:
    served, model_dir = app
    prep = RequestPreparer(model_dir, "float32", trust_remote_code=False)
    text = "the quick brown fox"
    tokens = post(served, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True}).json()
    assert tokens["tokens"] == prep.tokenizer(text)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    assert "".join(tokens["token_strs"]) == text and tokens["max_model_len"] > 0
    assert post(served, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": text}
    image = png(56, 56, seed=1)
    chat_ids = post(served, "/tokenize", {"messages": body("hi", [image])["messages"]}).json()["tokens"]
    answer = post(served, "/v1/chat/completions", body("hi", [image], max_tokens=1, return_token_ids=True)).json()
    assert chat_ids == answer["prompt_token_ids"]
    for path, payload, field in (("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {}, "prompt"),
                                 ("/tokenize", {"prompt": "x", "extra": 1}, "extra"),
                                 ("/tokenize", {"prompt": "x", "return_token_strs": "yes"}, "return_token_strs"),
                                 ("/detokenize", {"tokens": [-1]}, "tokens")):
        response = post(served, path, payload)
        assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert requests.get(f"{served.base_url}/version", timeout=30).json()["version"]


def test_ray_and_the_app_listen_on_loopback_only(app) -> None:
    """The embedded default opens no port beyond loopback (launch.ray_environment): every Ray
    process this test started (GCS, raylet, workers, agents, replicas) listens on 127.0.0.1 only."""
    import ipaddress

    import psutil

    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert len(listening) > 5, "expected Ray's own servers among this test's processes"
    for ip, port, pid in listening:
        address = ipaddress.ip_address(ip)
        address = address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address
        process = psutil.Process(pid)
        assert address.is_loopback, (f"{process.name()} (pid {pid}) listens on {ip}:{port}; its flags: "
                                     f"{[f for f in process.cmdline() if f.endswith(f'={port}')]}")
