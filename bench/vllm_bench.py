"""Ours vs vLLM's CPU build, both measured with vLLM's own client (`vllm bench serve`), in one run.

    python bench/vllm_bench.py                         # C = 1,4,16,64, text and image -> results/vllm_bench.json
    python bench/vllm_bench.py --concurrency 16 --systems ours --workloads text   # one cell, ours only

Each server is started, warmed up with a few requests, then every (workload, C) cell runs
`vllm bench serve` (vLLM's venv, `bench/peers/_vllm_entry.py cli bench serve`) with `--ignore-eos`:
- text: `--dataset-name random`, 128 prompt tokens, 64 output tokens;
- image: `--dataset-name random-mm`, 64 prompt tokens plus one 224x224 image, 64 output tokens.
Both through `openai-chat` (/v1/chat/completions), --num-prompts per cell (default 64).

Besides vLLM's own metrics, each cell records the server's CPU seconds per output token: user +
system time summed over the server's whole process tree (ours: the serve CLI, Ray's GCS, raylet,
Serve's controller and proxy, every replica; vLLM: API server, EngineCore, workers), read from
/proc before and after the cell. Ratios are ours/vLLM from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
from bench.peers import vllm_cpu  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
WORKLOADS: dict[str, list[str]] = {
    "text": ["--dataset-name", "random", "--random-input-len", "128"],
    "image": ["--dataset-name", "random-mm", "--random-input-len", "64",
              "--random-mm-base-items-per-request", "1",
              "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
              "--random-mm-bucket-config", "{(224, 224, 1): 1.0}"],
}
METRICS = ("completed", "failed", "duration", "output_throughput", "total_token_throughput", "request_throughput",
           "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "total_output_tokens", "total_input_tokens")


def tree_cpu_s(pid: int) -> float:
    """User + system seconds of `pid` and every live descendant (children that already exited and
    were reaped count through their parent's cutime/cstime)."""
    total = 0
    for p in {pid} | compare.descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / CLOCK_TICKS


def bench_command(base_url: str, model: str, tokenizer: str, workload: str, concurrency: int, num_prompts: int,
                  output_len: int, seed: int, result: Path) -> list[str]:
    return [vllm_cpu.VLLM_PYTHON, str(vllm_cpu.ENTRY), "cli", "bench", "serve",
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url", base_url,
            "--model", model, "--tokenizer", tokenizer, *WORKLOADS[workload],
            "--random-output-len", str(output_len), "--num-prompts", str(num_prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", str(seed), "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]


def run_cell(server_pid: int, base_url: str, model: str, tokenizer: str, workload: str, concurrency: int,
             num_prompts: int, output_len: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = bench_command(base_url, model, tokenizer, workload, concurrency, num_prompts, output_len, seed, result)
        cpu_before = tree_cpu_s(server_pid)
        done = subprocess.run(cmd, capture_output=True, text=True, env=vllm_cpu.environment(None), cwd=tmp,
                              timeout=1800)
        cpu_s = tree_cpu_s(server_pid) - cpu_before
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        raw = json.loads(result.read_text())
    out = {k: raw.get(k) for k in METRICS}
    out["server_cpu_s"] = round(cpu_s, 2)
    out["server_cpu_ms_per_output_token"] = 1e3 * cpu_s / max(raw.get("total_output_tokens") or 0, 1)
    out["loadavg_after"] = list(os.getloadavg())
    return out


def measure(args: argparse.Namespace, pid: int, base_url: str, model: str, tokenizer: str) -> dict[str, Any]:
    # Warm-up, the same for both servers: every path under load once (first-touch memory, caches,
    # connections); a server's first loaded run measured up to 35% slower than its second here.
    for workload in args.workloads:
        run_cell(pid, base_url, model, tokenizer, workload, 16, args.num_prompts, args.output_len, seed=999)
    cells: dict[str, Any] = {}
    for workload in args.workloads:
        for c in args.concurrency:
            compare.wait_for_quiet(args.max_load, 60)
            cell = run_cell(pid, base_url, model, tokenizer, workload, c, args.num_prompts, args.output_len,
                            seed=1000 + c)
            cells.setdefault(workload, {})[str(c)] = cell
            print(f"  {workload:6s} C={c:3d}: {cell['output_throughput']:7.1f} tok/s, TPOT {cell['mean_tpot_ms']:6.1f} "
                  f"ms, p99 ITL {cell['p99_itl_ms']:6.1f} ms, TTFT {cell['mean_ttft_ms']:7.1f} ms, CPU "
                  f"{cell['server_cpu_ms_per_output_token']:.2f} ms/tok, failed {cell['failed']}", file=sys.stderr)
    return cells


def in_process_rate(args: argparse.Namespace, concurrency: int = 16) -> dict[str, Any]:
    """The same engine without the serving path: `python -m runtime generate` on requests of the
    text cell's shape (about 128 prompt tokens, output_len tokens, temperature 1 as vLLM's bench
    sends, ignore_eos), one torch thread, max_num_seqs = C, the same KV cache size. Served tok/s
    at that C over this rate is the disaggregation tax (1.0 = none)."""
    from runtime.benchmark.workload import WorkloadSpec, build_requests

    spec = WorkloadSpec(num_requests=args.num_prompts, input_len=40, output_len=args.output_len,
                        images_per_request=0, seed=7)
    with tempfile.TemporaryDirectory(prefix="inproc-") as tmp:
        requests, results = Path(tmp) / "requests.jsonl", Path(tmp) / "results.jsonl"
        with requests.open("w") as f:
            for body in build_requests(spec, Path(args.model).name):
                body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
                f.write(json.dumps({**body, "temperature": 1.0}) + "\n")
        cmd = [sys.executable, "-m", "runtime", "--threads", "1", "generate", "--model", str(args.model),
               "--requests", str(requests), "--output", str(results), "--max-num-seqs", str(concurrency),
               "--kv-cache-mb", str(args.kv_cache_mb)]
        rates = []
        for _ in range(3):  # the best of three: the first also warms up
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), check=True)
            rates.append(float(done.stderr.strip().rsplit("(", 1)[1].split()[0]))
        prompt_tokens = json.loads(results.read_text().splitlines()[0])["usage"]["prompt_tokens"]
    return {"command": " ".join(cmd), "tokens_per_s": max(rates), "runs": rates, "prompt_tokens": prompt_tokens}


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Measured at the Router replica's own port (direct ingress, the configured port + 1); then the
    C=16 cells again through Serve's proxy (the configured port), to show what that hop costs."""
    port = compare.free_port(args.port)
    config, config_dict = compare.our_config(args, port, 1)
    log_path = Path(tempfile.gettempdir()) / f"vllm-bench-ours-{port}.log"
    proc = compare.start_ours(args, port, config, log_path)
    name, tokenizer = Path(args.model).name, str(args.model)
    try:
        cells = measure(args, proc.pid, f"http://127.0.0.1:{port + 1}", name, tokenizer)
        proxied = {}
        for workload in args.workloads:
            compare.wait_for_quiet(args.max_load, 60)
            proxied[workload] = {"16": run_cell(proc.pid, f"http://127.0.0.1:{port}", name, tokenizer, workload, 16,
                                                args.num_prompts, args.output_len, seed=1016)}
    finally:
        compare.stop_ours(proc)
        config.unlink(missing_ok=True)
    return {"command": proc.cmd, "config": config_dict, "log": str(log_path),  # type: ignore[attr-defined]
            "url": f"http://127.0.0.1:{port + 1} (direct ingress)", "cells": cells,
            "through_proxy": {"url": f"http://127.0.0.1:{port}", "cells": proxied}}


def run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    port = compare.free_port(args.port + 1)
    proc = vllm_cpu.start(str(args.model), port)
    try:
        cells = measure(args, proc.pid, f"http://127.0.0.1:{port}", proc.model_name,  # type: ignore[attr-defined]
                        proc.prepared_dir)  # type: ignore[attr-defined]
    finally:
        vllm_cpu.stop(proc)
    command = vllm_cpu.command(proc.prepared_dir, port, proc.model_name)  # type: ignore[attr-defined]
    return {"command": command, "log": proc.log_path, "cells": cells}  # type: ignore[attr-defined]


def ratios(systems: dict[str, Any]) -> dict[str, Any]:
    if not {"ours", "vllm"} <= systems.keys():
        return {}
    out: dict[str, Any] = {}
    for workload, by_c in systems["ours"]["cells"].items():
        for c, ours in by_c.items():
            peer = systems["vllm"]["cells"].get(workload, {}).get(c)
            if peer:
                out.setdefault(workload, {})[c] = {
                    k: ours[k] / peer[k] if peer.get(k) else None
                    for k in ("output_throughput", "mean_tpot_ms", "p99_itl_ms", "mean_ttft_ms",
                              "server_cpu_ms_per_output_token")
                }
    return out


def table(result: dict[str, Any]) -> str:
    rows = ["| workload | C | ours tok/s | vLLM tok/s | ratio | ours TPOT ms | vLLM TPOT ms | ours p99 ITL ms | "
            "vLLM p99 ITL ms | ours TTFT ms | vLLM TTFT ms | ours CPU ms/tok | vLLM CPU ms/tok |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    systems = result["systems"]
    for workload, by_c in systems.get("ours", {}).get("cells", {}).items():
        for c, o in by_c.items():
            v = systems.get("vllm", {}).get("cells", {}).get(workload, {}).get(c, {})

            def f(d: dict[str, Any], k: str, digits: int = 1) -> str:
                return f"{d[k]:.{digits}f}" if d.get(k) is not None else "-"

            ratio = f"{o['output_throughput'] / v['output_throughput']:.2f}x" if v else "-"
            rows.append(f"| {workload} | {c} | {f(o, 'output_throughput', 0)} | {f(v, 'output_throughput', 0)} | "
                        f"{ratio} | {f(o, 'mean_tpot_ms')} | {f(v, 'mean_tpot_ms')} | {f(o, 'p99_itl_ms')} | "
                        f"{f(v, 'p99_itl_ms')} | {f(o, 'mean_ttft_ms')} | {f(v, 'mean_ttft_ms')} | "
                        f"{f(o, 'server_cpu_ms_per_output_token', 2)} | {f(v, 'server_cpu_ms_per_output_token', 2)} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/tmp/cmp-ckpt"), help="mla576 checkpoint (built if absent)")
    p.add_argument("--systems", default="ours,vllm")
    p.add_argument("--workloads", default="text,image")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="our KV cache (vLLM gets 1 GiB)")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--max-load", type=float, default=0.8, help="wait for the 1-min load average below this")
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vllm_bench.json")
    args = p.parse_args(argv)
    args.systems = args.systems.split(",")
    args.workloads = args.workloads.split(",")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compare.ensure_checkpoint(args.model)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": compare.machine(),
                              "versions": compare.versions(), "args": {k: str(v) for k, v in vars(args).items()},
                              "systems": {}}
    for system in args.systems:
        print(f"{system}:", file=sys.stderr)
        result["systems"][system] = run_ours(args) if system == "ours" else run_vllm(args)
    result["ratios"] = ratios(result["systems"])
    if "ours" in args.systems and "text" in args.workloads and 16 in args.concurrency:
        compare.wait_for_quiet(args.max_load, 60)
        inproc = in_process_rate(args)
        served = result["systems"]["ours"]["cells"]["text"]["16"]["output_throughput"]
        result["in_process"] = {**inproc, "served_c16_over_in_process": served / inproc["tokens_per_s"]}
        print(f"in-process {inproc['tokens_per_s']:.0f} tok/s; served/in-process at C=16: "
              f"{result['in_process']['served_c16_over_in_process']:.2f}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
