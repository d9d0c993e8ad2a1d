"""`python -m runtime bench serve`: a load test against any OpenAI-compatible server, in the
spirit of `vllm bench serve`, with images (size, count per request, reuse ratio)."""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.benchmark import client, report
from runtime.benchmark.workload import WorkloadSpec, build_requests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128, help="words of random text per request")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-size", default="224x224", help="WIDTHxHEIGHT of each random image")
    parser.add_argument("--image-reuse", type=float, default=0.0, help="probability an image repeats an earlier one")
    parser.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    group.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests/s")
    parser.add_argument("--goodput", nargs=2, type=float, metavar=("TTFT_MS", "TPOT_MS"), default=None,
                        help="count requests meeting both targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--out", default="bench/results/serve.json")
    parser.add_argument("--chart", default=None, help="PNG path (default: next to --out)")
    parser.add_argument("--no-progress", action="store_true")


def spec_from(args: argparse.Namespace) -> WorkloadSpec:
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    return WorkloadSpec(num_requests=args.num_requests, input_len=args.input_len, output_len=args.output_len,
                        images_per_request=args.images_per_request, image_width=width, image_height=height,
                        image_reuse=args.image_reuse, ignore_eos=not args.no_ignore_eos, seed=args.seed)


def served_model(base_url: str, api_key: str | None) -> str:
    import requests

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return requests.get(f"{base_url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]


def run_benchmark(base_url: str, spec: WorkloadSpec, concurrency: int | None = None, rate: float | None = None,
                  model: str | None = None, api_key: str | None = None, goodput: tuple[float, float] | None = None,
                  timeout_s: float = 600, progress: bool = False) -> tuple[dict[str, Any], list]:
    """Run one workload; return (summary document, per-request results)."""
    model = model or served_model(base_url, api_key)
    bodies = build_requests(spec, model)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(bodies), desc="requests", unit="req")
    results, wall = asyncio.run(client.run(f"{base_url}/v1/chat/completions", bodies, concurrency, rate,
                                           api_key, timeout_s, spec.seed, bar))
    if bar is not None:
        bar.close()
    summary = report.summarize(results, wall, *(goodput or (None, None)))
    summary["config"] = {"base_url": base_url, "model": model, "concurrency": concurrency, "request_rate": rate,
                         "workload": asdict(spec), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "machine": platform.platform()}
    return summary, results


def main(args: argparse.Namespace) -> int:
    spec = spec_from(args)
    goodput = tuple(args.goodput) if args.goodput else None
    summary, results = run_benchmark(args.base_url.rstrip("/"), spec, args.concurrency, args.request_rate,
                                     args.model, args.api_key, goodput, args.timeout_s,
                                     progress=not args.no_progress)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary["requests_detail"] = [{"ok": r.ok, "status": r.status, "ttft_ms": r.ttft_s * 1e3, "e2e_ms": r.e2e_s * 1e3,
                                   "output_tokens": r.output_tokens, "error": r.error} for r in results]
    out.write_text(json.dumps(summary, indent=1))
    chart_path = args.chart or str(out.with_suffix(".png"))
    report.chart(results, chart_path, f"{summary['config']['model']} @ {args.base_url}")
    print(report.table(summary))
    print(f"wrote {out} and {chart_path}")
    return 0 if summary["failed"] == 0 else 1
