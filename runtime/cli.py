"""`python -m runtime <command>`: make-checkpoint, generate, demo, serve, bench serve, plan."""

from __future__ import annotations

import argparse
import base64
import io
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from runtime.checkpoint.tokenizer import TOKENIZER_FORMATS
from runtime.errors import RuntimeServingError

DEFAULT_DEMO_DIR = Path("checkpoints/tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for this process (default 2)")
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random Kimi-K2.5-style checkpoint")
    mk.add_argument("out")
    mk.add_argument("--preset", default="tiny")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dialect", choices=["original", "transformers"], default="transformers")
    mk.add_argument("--config-dialect", choices=["original", "transformers"], default=None,
                    help="config.json dialect if it should differ from the weights' (a mixed directory)")
    mk.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    mk.add_argument("--shards", type=int, default=1, help="split the weights into N safetensors files")
    mk.add_argument("--tokenizer", choices=list(TOKENIZER_FORMATS), default="tokenizers",
                    help="tokenizers: tokenizer.json; tiktoken: the official release's tiktoken.model with its "
                         "tokenization_kimi.py (loads only with --trust-remote-code)")
    mk.add_argument("--quantize", choices=["int4"], default=None,
                    help="store routed experts as the Kimi-K2.5 release does (compressed-tensors INT4, "
                         "group 32, bf16 scales); with --dtype bfloat16 the rest matches the release too")

    gen = sub.add_parser("generate", help="offline generation over a JSONL file of chat requests")
    gen.add_argument("--model", required=True)
    gen.add_argument("--requests", required=True, help="JSONL: one OpenAI chat-completions body per line")
    gen.add_argument("--output", required=True, help="JSONL: one result per input line, same order")
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--ep-size", type=int, default=1, help="expert-parallel ranks (processes) for the MoE layers")
    gen.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together at most")
    gen.add_argument("--max-num-batched-tokens", type=int, default=1024, help="token budget of one step")
    gen.add_argument("--kv-cache-mb", type=int, default=256, help="bytes of paged latent KV cache, in MiB")
    _add_trust_remote_code(gen)

    demo = sub.add_parser("demo", help="build the tiny checkpoint (once) and answer a request with an image")
    demo.add_argument("--model", default=str(DEFAULT_DEMO_DIR))
    _add_trust_remote_code(demo)

    srv = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server on a local Ray cluster")
    srv.add_argument("--model", default=None, help="checkpoint directory or 'tiny' (default: the config's)")
    srv.add_argument("--config", default=None, help="deploy YAML (default: the repository's deploy/local.yaml)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's, 8000)")
    srv.add_argument("--host", default=None, help="HTTP address (default: the config's, 127.0.0.1)")
    srv.add_argument("--served-model-name", nargs="+", default=None,
                     help="the names clients use for the model (default: --model as given, and its folder's name)")
    srv.add_argument("--once", action="store_true",
                     help="send one request with an image over HTTP, print the answer and stop")
    _add_trust_remote_code(srv, "(default: the config's trust_remote_code, false)")

    _add_plan_arguments(sub.add_parser("plan", help="memory per expert-parallel rank, from config.json alone"))

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    from runtime.benchmark.serve_bench import add_arguments

    add_arguments(bench.add_parser("serve", help="load-test an OpenAI-compatible server (TTFT, TPOT, ITL, goodput)"))

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    commands = {"make-checkpoint": _make_checkpoint, "generate": _generate, "demo": _demo, "serve": _serve,
                "bench": _bench, "plan": _plan}
    try:
        return commands[args.command](args)
    except RuntimeServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _add_trust_remote_code(parser: argparse.ArgumentParser, default: str = "") -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the checkpoint's own Python code run: a tokenizer class named by its "
                             f"tokenizer_config.json auto_map {default}".rstrip())


def _make_checkpoint(args: argparse.Namespace) -> int:
    from runtime.checkpoint.maker import make_checkpoint

    out = make_checkpoint(args.out, args.preset, args.seed, args.dialect, args.dtype, args.config_dialect, args.shards,
                          tokenizer=args.tokenizer, quantize=args.quantize)
    experts = ", INT4 routed experts" if args.quantize else ""
    print(f"wrote {args.preset} checkpoint ({args.dialect} layout, {args.dtype}{experts}, {args.tokenizer} tokenizer) "
          f"to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    """Queue every line, then let continuous batching run them all; results keep the input order."""
    from runtime.lm_service.offline import OfflineLLM
    from runtime.settings import EngineConfig

    config = EngineConfig(dtype=args.dtype, ep_size=args.ep_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_mb=args.kv_cache_mb,
                          trust_remote_code=args.trust_remote_code)
    llm = OfflineLLM(args.model, config)
    try:
        lines = [line for line in Path(args.requests).read_text().splitlines() if line.strip()]
        rejected = {i: err for i, line in enumerate(lines) if (err := _submit(llm, str(i), line)) is not None}
        start = time.perf_counter()
        results = llm.run()
        seconds = time.perf_counter() - start
    finally:
        llm.close()
    with open(args.output, "w") as out:
        for i in range(len(lines)):
            out.write(json.dumps(rejected[i] if i in rejected else results[str(i)].to_json()) + "\n")
    tokens = sum(len(r.token_ids) for r in results.values())
    print(f"{len(lines)} requests ({len(rejected)} rejected), {tokens} tokens in {seconds:.2f}s "
          f"({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def _submit(llm, request_id: str, line: str) -> dict | None:
    """Queue one JSONL line; an OpenAI-style error body if it is invalid."""
    from runtime.requests import parse_chat_request

    try:
        body = json.loads(line)
        llm.submit(request_id, parse_chat_request(body, llm.defaults.sampling))
        return None
    except json.JSONDecodeError as e:
        return _error(f"invalid JSON: {e}", "invalid_request_error", None)
    except RuntimeServingError as e:
        return _error(str(e), "invalid_request_error", getattr(e, "field", None))


def _error(message: str, kind: str, field: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": field}}


def _demo(args: argparse.Namespace) -> int:
    from runtime.checkpoint.maker import make_checkpoint
    from runtime.lm_service.offline import OfflineLLM
    from runtime.requests import parse_chat_request
    from runtime.settings import EngineConfig

    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        make_checkpoint(model_dir, "tiny", seed=0)
        print(f"built the tiny checkpoint in {model_dir}")
    model = OfflineLLM(model_dir, EngineConfig(trust_remote_code=args.trust_remote_code))
    body = {
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": sample_image_data_url()}},
            {"type": "text", "text": "Describe the image in one sentence."},
        ]}],
        "max_tokens": 24,
        "temperature": 0,
    }
    start = time.perf_counter()
    result = model.generate(parse_chat_request(body, model.defaults.sampling))
    seconds = time.perf_counter() - start
    print(f"prompt: {result.prompt_tokens} tokens (with one 112x84 image); "
          f"answer: {len(result.token_ids)} tokens in {seconds:.2f}s, finish_reason={result.finish_reason}")
    print(f"answer text (random weights, so it is noise): {result.text!r}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import ray

    from runtime.config import AppConfig
    from runtime.router import launch

    overrides: dict[str, Any] = {"trust_remote_code": True} if args.trust_remote_code else {}
    if args.served_model_name:
        overrides["served_model_name"] = args.served_model_name
    config = launch.load_config(args.config or launch.DEFAULT_CONFIG, args.model, args.port, args.host, overrides)
    AppConfig.model_validate(config["applications"][0].get("args") or {})  # a refused checkpoint stops here
    url = launch.base_url(config)
    launch.check_port_free(config)  # else /health would be answered by whatever holds the port
    launch.start_ray(config, include_dashboard=False, configure_logging=False, log_to_driver=False)
    # SIGTERM (kill, a process manager, a background job where SIGINT is ignored) stops it cleanly too.
    # Installed after ray.init, whose own handler would otherwise abort the process on SIGTERM.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        start = time.perf_counter()
        launch.deploy(config)
        launch.wait_ready(url)
        print(f"serving at {url} (ready in {time.perf_counter() - start:.0f}s): POST {url}/v1/chat/completions, "
              f"GET {url}/v1/models, {url}/health, {url}/metrics, {url}/stats", flush=True)
        print(f"the Router replica also answers directly at {launch.direct_url(config)} (no proxy hop: fastest)",
              flush=True)
        if args.once:
            return _ask_once(url)
        print("Ctrl-C stops it.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (only its config.json is read)")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence in the KV cache")
    p.add_argument("--batch", type=int, default=16, help="sequences held in the KV cache at once")
    p.add_argument("--experts", choices=["int4", "bf16", "auto"], default="auto",
                   help="routed-expert format; auto: the config's quantization_config, else its dtype")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="everything but the routed experts, and the KV cache unless --kv-fp8")
    p.add_argument("--kv-fp8", action="store_true", help="an fp8 (e4m3) KV cache, as the engine's kv_fp8")
    p.add_argument("--ep-size", type=int, default=None, help="show this EP size (default: powers of two)")
    p.add_argument("--device-memory-gib", type=float, default=None, help="find the smallest EP size that fits")
    p.add_argument("--reserve-gib", type=float, default=8.0, help="kept free on every rank for activations")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _plan(args: argparse.Namespace) -> int:
    from runtime.models.config import load_model_config
    from runtime.plan import PlanInputs, expert_format, make_plan, render, report

    cfg = load_model_config(args.model)
    if args.ep_size is not None and not 1 <= args.ep_size <= cfg.text.n_routed_experts:
        print(f"error: --ep-size must be 1..{cfg.text.n_routed_experts} (the routed experts)", file=sys.stderr)
        return 2
    inputs = PlanInputs(args.context, args.batch, expert_format(cfg, args.experts), args.kv_fp8,
                        16 if args.dtype == "bfloat16" else 32, args.reserve_gib)
    rep = report(make_plan(cfg, inputs), args.ep_size, args.device_memory_gib)
    print(json.dumps(rep, indent=2) if args.json else render(rep))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from runtime.benchmark.serve_bench import main as bench_serve

    return bench_serve(args)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ask_once(url: str) -> int:
    import requests

    body: dict[str, Any] = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": sample_image_data_url()}},
        {"type": "text", "text": "Describe the image in one sentence."}]}],
        "max_tokens": 24, "temperature": 0}
    start = time.perf_counter()
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    seconds = time.perf_counter() - start
    answer = response.json()
    if response.status_code != 200:
        print(f"error {response.status_code}: {answer}", file=sys.stderr)
        return 1
    message, usage = answer["choices"][0]["message"], answer["usage"]
    print(f"HTTP {response.status_code} in {seconds:.2f}s: prompt {usage['prompt_tokens']} tokens (one 112x84 image), "
          f"answer {usage['completion_tokens']} tokens, finish_reason={answer['choices'][0]['finish_reason']}")
    print(f"reasoning_content: {message.get('reasoning_content')!r}\ncontent: {message['content']!r} "
          "(random weights, so it is noise)")
    return 0


def sample_image_data_url(width: int = 112, height: int = 84) -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (240, 240, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 48, 40), fill=(200, 30, 30))
    draw.ellipse((60, 30, 104, 76), fill=(30, 80, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
