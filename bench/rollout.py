"""A GRPO-shaped rollout loop against our server: generate, sleep, wake, update the weights, repeat.

    python bench/rollout.py                  # 3 rounds of 8 prompts x 8 samples -> results/rollout.json

What an RL trainer colocated with the engine (Miles' Kimi-K2.5 recipe: GRPO, 8 samples per prompt,
temperature 1, routing replay) asks of it, at the `tiny` checkpoint's scale. The script builds two
`tiny` checkpoints, A (seed 0) and B (seed 1: same shapes, other weights), and starts
`python -m runtime serve` on A (deploy/local.yaml with `admin.enabled` and an `api_key`). Then, each round:

1. rollout: the P prompts (some with an image) go out together, each one request to
   /v1/chat/completions with n samples, temperature 1, a seed, max_tokens capped, ignore_eos off and
   `return_routed_experts` (SGLang's /generate takes neither images nor that field here). Every
   sample's routed experts must have shape [prompt + completion - 1, MoE layers, experts per token]
   and as many bytes; every response's `x-weights-version` must be the version last installed;
2. POST /admin/sleep {"level": 1} (timed; a request meanwhile must get 503), POST /admin/wake (timed);
3. POST /admin/update_weights to the other checkpoint (A, B, A, ...; timed); the answer's
   weights_version and a one-token /generate probe (header and meta_info.weight_version) must show
   the next version.

After the last round /stats must show nothing held: no KV block used, nothing running or waiting,
no vision reference or vision request live, nothing in flight at the router. Every HTTP call has
a timeout; a failed or hung call is recorded with its status and body, not retried.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
from runtime.benchmark.workload import png_data_url  # noqa: E402
from runtime.router import launch  # noqa: E402

KEY = "sk-rollout-bench"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
TOPICS = ["the sum of the first ten primes", "why the sky is blue", "a proof that sqrt 2 is irrational",
          "how a hash map grows", "the rules of chess castling", "what a Fourier transform does",
          "the derivative of x^x", "how tides work"]
OPS = ("sleep", "wake", "update")
WARMUP_ROUND = 99  # its prompts' seeds and images: none of a measured round's
PROBE = {"input_ids": [5, 17, 23, 42, 8, 99, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 6,
                                                                     "ignore_eos": True}}


# --- the server -------------------------------------------------------------------------------


def checkpoints(workdir: Path) -> tuple[Path, Path]:
    """`tiny` A (seed 0) and B (seed 1), built once into `workdir`."""
    paths = []
    for name, seed in (("a", 0), ("b", 1)):
        path = workdir / name
        if not (path / "config.json").is_file():
            subprocess.run([sys.executable, "-m", "runtime", "make-checkpoint", str(path), "--preset", "tiny",
                            "--seed", str(seed)], cwd=str(ROOT), check=True)
        paths.append(path)
    return paths[0], paths[1]


def routing_shape(model: Path) -> tuple[int, int]:
    """(MoE layers, experts per token) from the checkpoint's config."""
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config", config)
    return text["num_hidden_layers"] - text["first_k_dense_replace"], text["num_experts_per_tok"]


def write_config(model: Path, port: int) -> tuple[Path, dict[str, Any]]:
    config = launch.load_config(launch.DEFAULT_CONFIG, model=str(model), port=port,
                                args={"api_key": KEY, "admin": {"enabled": True}})
    fd, path = tempfile.mkstemp(prefix="rollout-serve-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(path), config


def call(base_url: str, method: str, path: str, timeout_s: float, payload: dict[str, Any] | None = None,
         ) -> tuple[requests.Response | None, float, str | None]:
    """(response or None, seconds, error): a timeout or connection error is recorded, not raised."""
    started = time.perf_counter()
    try:
        response = requests.request(method, f"{base_url}{path}", headers=AUTH, timeout=timeout_s,
                                    data=None if payload is None else json.dumps(payload))
        return response, time.perf_counter() - started, None
    except requests.RequestException as e:
        return None, time.perf_counter() - started, f"{type(e).__name__}: {e}"


def failure(path: str, response: requests.Response | None, error: str | None, seconds: float) -> dict[str, Any]:
    return {"path": path, "status": None if response is None else response.status_code,
            "body": error if response is None else response.text[:2000], "seconds": round(seconds, 3)}


# --- one rollout round -----------------------------------------------------------------------


def prompt_body(args: argparse.Namespace, index: int, round_: int) -> dict[str, Any]:
    """Prompt `index`: a question, with a random-noise image for every `image_every`-th prompt."""
    text = f"Question {index}: explain {TOPICS[index % len(TOPICS)]}. Think step by step."
    content: Any = text
    if args.image_every and index % args.image_every == 0:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(args.image_size, args.image_size,
                                                                           seed=1000 * round_ + index)}},
                   {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "n": args.n, "temperature": args.temperature,
            "seed": args.seed + 10_000 * round_ + 100 * index, "max_tokens": args.max_new_tokens,
            "return_routed_experts": True, "return_token_ids": True}


def check_choice(choice: dict[str, Any], prompt_tokens: int, layers: int, topk: int) -> tuple[int, int, str | None]:
    """(completion tokens, routing bytes on the wire) of one sample, and what is wrong with its routing."""
    tokens = len(choice.get("token_ids") or [])
    routed = choice.get("routed_experts")
    if routed is None:
        return tokens, 0, "no routed_experts"
    want = [prompt_tokens + tokens - 1, layers, topk]
    raw = base64.b64decode(routed["data"])
    if routed["shape"] != want or routed["dtype"] != "int16" or len(raw) != 2 * want[0] * layers * topk:
        return tokens, len(routed["data"]), f"shape {routed['shape']} {routed['dtype']} {len(raw)} bytes, want {want}"
    return tokens, len(routed["data"]), None


def one_prompt(args: argparse.Namespace, base_url: str, body: dict[str, Any], layers: int, topk: int,
               version: int) -> dict[str, Any]:
    response, seconds, error = call(base_url, "POST", "/v1/chat/completions", args.timeout_s, body)
    if response is None or response.status_code != 200:
        return {"error": failure("/v1/chat/completions", response, error, seconds)}
    out = response.json()
    prompt_tokens = out["usage"]["prompt_tokens"]
    checked = [check_choice(c, prompt_tokens, layers, topk) for c in out["choices"]]
    problems = [p for _, _, p in checked if p]
    header = response.headers.get("x-weights-version")
    if header != str(version):
        problems.append(f"x-weights-version {header}, want {version}")
    distinct = len({tuple(c.get("token_ids") or []) for c in out["choices"]})  # seed + i: n different samples
    return {"seconds": seconds, "samples": len(out["choices"]), "distinct_samples": distinct,
            "prompt_tokens": prompt_tokens, "completion_tokens": sum(t for t, _, _ in checked),
            "routed_rows": sum(prompt_tokens + t - 1 for t, _, _ in checked),
            "routing_b64_bytes": sum(b for _, b, _ in checked), "problems": problems,
            "finish_reasons": sorted({c["finish_reason"] for c in out["choices"]})}


def rollout(args: argparse.Namespace, base_url: str, round_: int, layers: int, topk: int,
            version: int) -> dict[str, Any]:
    bodies = [prompt_body(args, i, round_) for i in range(args.prompts)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.prompts) as pool:
        outs = list(pool.map(lambda b: one_prompt(args, base_url, b, layers, topk, version), bodies))
    wall = time.perf_counter() - started
    done = [o for o in outs if "error" not in o]
    tokens = sum(o["completion_tokens"] for o in done)
    rows = sum(o["routed_rows"] for o in done)
    b64 = sum(o["routing_b64_bytes"] for o in done)
    return {"wall_s": round(wall, 3), "requests": len(bodies), "failed": [o["error"] for o in outs if "error" in o],
            "samples": sum(o["samples"] for o in done), "completion_tokens": tokens,
            "distinct_samples": sum(o["distinct_samples"] for o in done),
            "prompt_tokens": sum(o["prompt_tokens"] for o in done),
            "tokens_per_s": round(tokens / wall, 1) if wall else None,
            "routed_rows": rows, "routing_b64_bytes": b64,
            "routing_problems": [p for o in done for p in o["problems"]],
            "finish_reasons": sorted({r for o in done for r in o["finish_reasons"]}),
            "request_seconds_max": round(max((o["seconds"] for o in done), default=0.0), 3)}


# --- sleep, wake, update ------------------------------------------------------------------------


def admin(args: argparse.Namespace, base_url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response, seconds, error = call(base_url, "POST", path, args.admin_timeout_s, payload)
    if response is None or response.status_code != 200:
        return {"ok": False, "error": failure(path, response, error, seconds), "seconds": round(seconds, 3)}
    body = response.json()
    return {"ok": True, "seconds": round(seconds, 4), "server_seconds": body.get("seconds"),
            "replicas": body.get("replicas"), "weights_version": body.get("weights_version")}


def refused_while_asleep(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    response, seconds, error = call(base_url, "POST", "/generate", args.timeout_s,
                                    {"input_ids": [5, 17, 23], "sampling_params": {"max_new_tokens": 1}})
    return {"status": None if response is None else response.status_code, "error": error,
            "retry_after": None if response is None else response.headers.get("Retry-After"),
            "seconds": round(seconds, 3)}


def version_probe(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    """A short greedy /generate: the version in its header and meta_info, and its tokens (which tell
    checkpoint A's weights from B's)."""
    response, seconds, error = call(base_url, "POST", "/generate", args.timeout_s, PROBE)
    if response is None or response.status_code != 200:
        return {"error": failure("/generate", response, error, seconds)}
    out = response.json()
    return {"header": response.headers.get("x-weights-version"), "meta_info": out["meta_info"]["weight_version"],
            "output_ids": out["output_ids"]}


def cycle(args: argparse.Namespace, base_url: str, target: Path, version: int) -> dict[str, Any]:
    """Sleep (level 1), a request while asleep, wake, update to `target` (expected: version + 1)."""
    out: dict[str, Any] = {"sleep": admin(args, base_url, "/admin/sleep", {"level": 1, "mode": "drain"})}
    if out["sleep"]["ok"]:
        out["while_asleep"] = refused_while_asleep(args, base_url)
    out["wake"] = admin(args, base_url, "/admin/wake", {})
    out["update"] = admin(args, base_url, "/admin/update_weights", {"path": str(target), "mode": "drain"})
    out["update"]["target"] = target.name
    out["probe"] = version_probe(args, base_url)
    want = str(version + 1)
    out["version_advanced"] = (out["update"].get("weights_version") == version + 1
                               and out["probe"].get("header") == want and out["probe"].get("meta_info") == want)
    return out


# --- leaks ----------------------------------------------------------------------------------------


def held(stats: dict[str, Any]) -> dict[str, int]:
    lm = [s["engine"] for s in stats["lm"].values()]
    return {"kv_blocks_used": sum(e["kv_blocks_used"] for e in lm), "running": sum(e["running"] for e in lm),
            "waiting": sum(e["waiting"] for e in lm),
            "vision_client_requests": sum(s["vision_client"]["requests"] for s in stats["lm"].values()),
            "vision_live_references": sum(s["cache"]["live_references"] for s in stats["vision"].values()),
            "router_in_flight": stats["router"]["in_flight"]}


def leak_check(args: argparse.Namespace, base_url: str, timeout_s: float = 20) -> dict[str, Any]:
    """/stats until nothing is held (replicas report every ~0.25 s), or what was still held at the deadline."""
    started = time.monotonic()
    while True:
        response, _, error = call(base_url, "GET", "/stats", 30)
        if response is None or response.status_code != 200:
            return {"ok": False, "error": error or response.text[:500] if response is not None else error}
        now = held(response.json())
        if not any(now.values()) or time.monotonic() - started > timeout_s:
            return {"ok": not any(now.values()), "held": now, "waited_s": round(time.monotonic() - started, 2),
                    "kv_blocks_total": sum(s["engine"]["kv_blocks_total"] for s in response.json()["lm"].values())}
        time.sleep(0.25)


# --- main -----------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)} if values else None


def summarize(rounds: list[dict[str, Any]], layers: int, topk: int) -> dict[str, Any]:
    roll = [r["rollout"] for r in rounds]
    cycles = [r["cycle"] for r in rounds]
    tokens, wall = sum(r["completion_tokens"] for r in roll), sum(r["wall_s"] for r in roll)
    rows, b64 = sum(r["routed_rows"] for r in roll), sum(r["routing_b64_bytes"] for r in roll)
    return {"tokens_per_s_per_round": [r["tokens_per_s"] for r in roll],
            "tokens_per_s_overall": round(tokens / wall, 1) if wall else None,
            "samples_per_round": [r["samples"] for r in roll], "completion_tokens": tokens,
            "distinct_samples_per_round": [r["distinct_samples"] for r in roll],
            "failed_requests": sum(len(r["failed"]) for r in roll),
            "routing_problems": sum(len(r["routing_problems"]) for r in roll),
            "routing_raw_bytes_per_routed_token": 2 * layers * topk,
            "routing_b64_bytes_per_routed_token": round(b64 / rows, 2) if rows else None,
            "routing_b64_bytes_per_completion_token": round(b64 / tokens, 2) if tokens else None,
            **{f"{op}_s": spread([c[op]["seconds"] for c in cycles if c[op]["ok"]]) for op in OPS},
            **{f"{op}_failed": sum(not c[op]["ok"] for c in cycles) for op in OPS},
            "refused_while_asleep": [c.get("while_asleep", {}).get("status") for c in cycles],
            "version_advanced": [c["version_advanced"] for c in cycles]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-every", type=int, default=4, help="prompt i has an image when i %% this == 0 (0: none)")
    ap.add_argument("--image-size", type=int, default=112, help="square random-noise PNG, pixels a side")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/rollout-bench"), help="checkpoints A and B")
    ap.add_argument("--port", type=int, default=8370)
    ap.add_argument("--timeout-s", type=float, default=240, help="per rollout request")
    ap.add_argument("--admin-timeout-s", type=float, default=120, help="per admin call")
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    return ap.parse_args(argv)


def run(args: argparse.Namespace, base_url: str, a: Path, b: Path) -> dict[str, Any]:
    layers, topk = routing_shape(a)
    warmup = rollout(argparse.Namespace(**{**vars(args), "prompts": 2, "n": 2, "max_new_tokens": 4}), base_url,
                     WARMUP_ROUND, layers, topk, 0)
    baseline = version_probe(args, base_url)  # checkpoint A's greedy tokens
    rounds: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        version, serving, other = round_, *((a, b) if round_ % 2 == 0 else (b, a))
        result: dict[str, Any] = {"round": round_, "weights": serving.name, "weights_version": version,
                                  "rollout": rollout(args, base_url, round_, layers, topk, version)}
        result["cycle"] = cycle(args, base_url, other, version)
        result["held_after_cycle"] = leak_check(args, base_url, timeout_s=5)
        rounds.append(result)
        r, c = result["rollout"], result["cycle"]
        print(f"round {round_}: {r['samples']} samples, {r['completion_tokens']} tokens in {r['wall_s']:.1f}s "
              f"({r['tokens_per_s']} tok/s), routing problems {len(r['routing_problems'])}, failed {len(r['failed'])}; "
              f"sleep {c['sleep']['seconds']}s wake {c['wake']['seconds']}s update {c['update']['seconds']}s "
              f"version advanced {c['version_advanced']}", file=sys.stderr)
    summary = summarize(rounds, layers, topk)
    # After an update to A the probe must give A's tokens again, after one to B others.
    summary["probe_tokens_follow_weights"] = [
        (r["cycle"]["probe"].get("output_ids") == baseline.get("output_ids"))
        == (r["cycle"]["update"]["target"] == a.name) for r in rounds]
    return {"routing_shape": {"moe_layers": layers, "experts_per_token": topk}, "warmup": warmup,
            "baseline_probe": baseline, "rounds": rounds, "final_leak_check": leak_check(args, base_url),
            "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    a, b = checkpoints(args.workdir)
    port = compare.free_port(args.port)
    config, config_dict = write_config(a, port)
    log_path = Path(tempfile.gettempdir()) / f"rollout-serve-{port}.log"
    proc = compare.start_ours(argparse.Namespace(model=a, start_timeout_s=args.start_timeout_s), port, config, log_path)
    started_s = time.monotonic() - t0
    try:
        result = run(args, f"http://127.0.0.1:{port}", a, b)
    finally:
        leftover = compare.stop_ours(proc)
        config.unlink(missing_ok=True)
    result = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": compare.machine(),
              "loadavg_end": list(os.getloadavg()), "versions": compare.versions(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "command": proc.cmd, "config": config_dict, "start_s": round(started_s, 1),  # type: ignore[attr-defined]
              "total_s": round(time.monotonic() - t0, 1), "log": str(log_path), "killed_after_stop": leftover,
              **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1))
    print(json.dumps(result["final_leak_check"]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
