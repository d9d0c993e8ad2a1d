"""Ours (the Serve app) vs vLLM's CPU build vs transformers `generate`: the same workloads, in one run.

    python bench/compare.py                  # C = 1,4,16,64; all workloads and systems -> results/compare.json
    python bench/compare.py --quick          # C = 1,4, fewer requests: a smoke run of every path

Checkpoint: `mla576` (seed 0, original layout), the only preset vLLM's CPU MLA kernel takes, built
once into --model. Workloads (`runtime.benchmark.workload`): --input-len random words, then exactly
--output-len greedy tokens (ignore_eos); text-only, or one random-noise image (--image-size) per
request with 0% or 80% chance that the image repeats an earlier one of the same run. At
concurrency C, max(--min-requests, --requests-per-slot x C) requests go through
`run_benchmark` (a closed loop: at most C streamed requests in flight, TTFT = first text chunk).

Systems, one at a time, each after the 1-minute load average has dropped below --max-load:

- ours: `python -m runtime serve` with deploy/local.yaml (model and port overridden), once with
  one VisionService replica (every workload) and once with two (the image workloads only).
- vllm: `bench/peers/vllm_cpu.py` (its own venv; flags and versions recorded).
- transformers: `Kimi_K25ForConditionalGeneration.generate` in this process, no server, on the same
  prompt ids and pixels our router would build. --hf-requests requests per workload are timed one
  after another (TTFT from a streamer, in the same call). Being sequential, its throughput does not
  depend on C; its latencies at C are modelled for the same closed loop: request k waits
  min(k, C - 1) service times (the mean measured one) before it starts.

Every server is warmed up with a few requests of another seed first. The JSON keeps every summary
(throughput, TTFT/TPOT/E2E mean/p50/p99, failures), ratios ours/peer (output tok/s: above 1x we
win; TTFT p50: below 1x we win), versions, vLLM's command line, machine and load averages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.peers import vllm_cpu  # noqa: E402
from runtime.benchmark.serve_bench import run_benchmark  # noqa: E402
from runtime.benchmark.workload import WorkloadSpec, build_requests  # noqa: E402
from runtime.router import launch  # noqa: E402

WORKLOADS: dict[str, dict[str, Any]] = {
    "text": {"images_per_request": 0, "image_reuse": 0.0},
    "image-reuse0": {"images_per_request": 1, "image_reuse": 0.0},
    "image-reuse80": {"images_per_request": 1, "image_reuse": 0.8},
}
IMAGE_WORKLOADS = [w for w, kw in WORKLOADS.items() if kw["images_per_request"]]


# --- workloads ----------------------------------------------------------------------------------


def workload_seed(workload: str, concurrency: int) -> int:
    """Distinct per (workload, C), the same for every system: no image or prompt repeats across cells."""
    return 10 * concurrency + list(WORKLOADS).index(workload) + 1


def make_spec(args: argparse.Namespace, workload: str, concurrency: int, num_requests: int | None = None,
              seed: int | None = None) -> WorkloadSpec:
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    n = num_requests or max(args.min_requests, args.requests_per_slot * concurrency)
    return WorkloadSpec(num_requests=n, input_len=args.input_len, output_len=args.output_len,
                        image_width=width, image_height=height, ignore_eos=True,
                        seed=workload_seed(workload, concurrency) if seed is None else seed,
                        **WORKLOADS[workload])


def cells(args: argparse.Namespace, workloads: list[str]) -> list[tuple[str, int]]:
    return [(w, c) for w in workloads for c in args.concurrency]


# --- machine state ------------------------------------------------------------------------------


def wait_for_quiet(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Poll the 1-minute load average until it is below `max_load` (or give up); report what was seen."""
    start = time.monotonic()
    while True:
        load = os.getloadavg()
        waited = time.monotonic() - start
        if load[0] < max_load or waited >= max_wait_s:
            quiet = load[0] < max_load
            print(f"  load {load[0]:.2f} after {waited:.0f}s{'' if quiet else ' (gave up waiting)'}", file=sys.stderr)
            return {"loadavg": list(load), "waited_s": round(waited, 1), "quiet": quiet}
        time.sleep(5)


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc; Ray's raylet and workers hang below the driver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def versions() -> dict[str, Any]:
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__}


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count()}


# --- servers: ours and vLLM ---------------------------------------------------------------------


def measure_server(args: argparse.Namespace, base_url: str, model: str, workloads: list[str]) -> dict[str, Any]:
    """Warm-up, then every (workload, C) cell against one running server."""
    for workload in workloads[:2]:
        run_benchmark(base_url, make_spec(args, workload, 2, num_requests=4, seed=999), concurrency=2, model=model,
                      timeout_s=args.timeout_s)
    out: dict[str, Any] = {}
    for workload, c in cells(args, workloads):
        summary, _ = run_benchmark(base_url, make_spec(args, workload, c), concurrency=c, model=model,
                                   timeout_s=args.timeout_s)
        summary["loadavg_after"] = list(os.getloadavg())
        out.setdefault(workload, {})[str(c)] = summary
        print(f"  {workload:14s} C={c:3d}: {summary['output_token_throughput']:7.1f} tok/s, TTFT p50 "
              f"{summary['ttft_ms']['p50']:8.1f} ms, failed {summary['failed']}", file=sys.stderr)
    return out


def our_config(args: argparse.Namespace, port: int, vision_replicas: int) -> tuple[Path, dict[str, Any]]:
    """deploy/local.yaml with the checkpoint, the port and VisionService's replica count changed, and
    the same KV cache size vLLM gets (VLLM_CPU_KVCACHE_SPACE=1 GiB): local.yaml's 64 MiB holds only
    ~14k tokens of this checkpoint, so C=64 would measure preemption, not serving."""
    config = launch.load_config(launch.DEFAULT_CONFIG, model=str(args.model), port=port,
                                replicas={"VisionService": vision_replicas},
                                args={"engine": {"kv_cache_mb": args.kv_cache_mb}})
    fd, path = tempfile.mkstemp(prefix="compare-serve-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(path), config


def start_ours(args: argparse.Namespace, port: int, config: Path, log_path: Path) -> subprocess.Popen:
    """`python -m runtime serve` in its own session; returns once GET /health is 200."""
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", str(args.model), "--port", str(port),
           "--config", str(config)]
    log = open(log_path, "w")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log.close()
    proc.cmd = cmd  # type: ignore[attr-defined]
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"our server exited with {proc.returncode}; log {log_path}:\n"
                               + log_path.read_text()[-3000:])
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            if r.status == 200:
                return proc
        time.sleep(1)
    stop_ours(proc)
    raise RuntimeError(f"our server did not answer /health in {args.start_timeout_s}s; log {log_path}")


def stop_ours(proc: subprocess.Popen) -> list[int]:
    """SIGTERM (serve and Ray shut down in its `finally`), then kill whatever of its process tree is left.

    Only this server's own descendants are touched: another Ray cluster (tests) may share the machine.
    """
    tree = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    time.sleep(2)
    leftover = [pid for pid in sorted(tree) if alive(pid)]
    for pid in leftover:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return leftover


def run_ours(args: argparse.Namespace, vision_replicas: int, workloads: list[str]) -> dict[str, Any]:
    port = free_port(args.port)
    config, config_dict = our_config(args, port, vision_replicas)
    log_path = Path(tempfile.gettempdir()) / f"compare-ours-{port}.log"
    t0 = time.monotonic()
    proc = start_ours(args, port, config, log_path)
    started_s = time.monotonic() - t0
    try:
        cells_out = measure_server(args, f"http://127.0.0.1:{port}", Path(args.model).name, workloads)
    finally:
        leftover = stop_ours(proc)
        config.unlink(missing_ok=True)
    return {"command": proc.cmd, "config": config_dict, "vision_replicas": vision_replicas,  # type: ignore[attr-defined]
            "start_s": round(started_s, 1), "log": str(log_path), "killed_after_stop": leftover, "cells": cells_out}


def run_vllm(args: argparse.Namespace, workloads: list[str]) -> dict[str, Any]:
    port = free_port(args.port + 1)
    t0 = time.monotonic()
    proc = vllm_cpu.start(str(args.model), port)
    started_s = time.monotonic() - t0
    try:
        cells_out = measure_server(args, f"http://127.0.0.1:{port}", proc.model_name, workloads)  # type: ignore[attr-defined]
    finally:
        vllm_cpu.stop(proc)
    command = vllm_cpu.command(proc.prepared_dir, port, proc.model_name)  # type: ignore[attr-defined]
    return {"command": command, "start_s": round(started_s, 1), "log": proc.log_path,  # type: ignore[attr-defined]
            "cells": cells_out}


# --- transformers, offline ----------------------------------------------------------------------


class FirstTokenTimer:
    """A `generate` streamer that notes when the first new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.first_token_at = 0, 0.0

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_inputs(preparer: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The prompt ids our router builds, and pixels as our vision service preprocesses them."""
    import torch

    from runtime.requests import parse_chat_request
    from runtime.vision_service.preprocess import decode_image, preprocess_batch

    chat = parse_chat_request(body)
    ids = preparer.prepare("hf", chat).prompt_ids
    inputs: dict[str, Any] = {"input_ids": torch.tensor([ids]),
                              "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if chat.images:
        pixels, grids = preprocess_batch([decode_image(b) for b in chat.images], preparer.processor)
        inputs["pixel_values"] = pixels
        inputs["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    return inputs


def time_generate(model: Any, inputs: dict[str, Any], output_len: int) -> dict[str, float]:
    import torch

    timer = FirstTokenTimer()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                             streamer=timer)
        e2e = time.perf_counter() - t0
    return {"ttft_s": timer.first_token_at - t0, "e2e_s": e2e,
            "prompt_tokens": inputs["input_ids"].shape[1], "output_tokens": out.shape[1] - inputs["input_ids"].shape[1]}


def _stats_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))] * 1e3

    return {"mean": statistics.mean(ordered) * 1e3, "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": ordered[-1] * 1e3}


def queued_summary(timed: list[dict[str, float]], concurrency: int, num_requests: int) -> dict[str, Any]:
    """One request at a time, C in flight (closed loop): request k waits min(k, C-1) mean service times."""
    service = statistics.mean(t["e2e_s"] for t in timed)
    ttft_alone = statistics.mean(t["ttft_s"] for t in timed)
    tokens = statistics.mean(t["output_tokens"] for t in timed)
    waits = [min(k, concurrency - 1) * service for k in range(num_requests)]
    wall = num_requests * service
    tpot = (service - ttft_alone) / (tokens - 1) if tokens > 1 else 0.0
    return {"requests": num_requests, "completed": num_requests, "failed": 0, "errors": [], "wall_s": wall,
            "modelled": True, "request_throughput": 1 / service, "output_token_throughput": tokens / service,
            "ttft_ms": _stats_ms([w + ttft_alone for w in waits]), "tpot_ms": _stats_ms([tpot]),
            "e2e_ms": _stats_ms([w + service for w in waits])}


def run_transformers(args: argparse.Namespace, workloads: list[str]) -> dict[str, Any]:
    import torch

    from runtime.router.prepare import RequestPreparer
    from tests.reference import reference_model

    torch.set_num_threads(args.hf_threads)
    model = reference_model(str(args.model))
    preparer = RequestPreparer(args.model, "float32", trust_remote_code=False)
    warm = build_requests(make_spec(args, workloads[-1], 1, num_requests=2, seed=999), "m")
    for body in warm:
        time_generate(model, hf_inputs(preparer, body), 4)
    out: dict[str, Any] = {"threads": args.hf_threads, "timed": {}, "cells": {}}
    for workload in workloads:
        bodies = build_requests(make_spec(args, workload, 1, num_requests=args.hf_requests, seed=777), "m")
        timed = [time_generate(model, hf_inputs(preparer, b), args.output_len) for b in bodies]
        out["timed"][workload] = timed
        for c in args.concurrency:
            n = max(args.min_requests, args.requests_per_slot * c)
            out["cells"].setdefault(workload, {})[str(c)] = queued_summary(timed, c, n)
        s = out["cells"][workload][str(args.concurrency[0])]
        print(f"  {workload:14s} sequential: {s['output_token_throughput']:7.1f} tok/s, "
              f"{statistics.mean(t['e2e_s'] for t in timed) * 1e3:.1f} ms per request", file=sys.stderr)
    return out


# --- ratios and tables --------------------------------------------------------------------------


def cell(result: dict[str, Any], system: str, workload: str, c: int) -> dict[str, Any] | None:
    return ((result["systems"].get(system) or {}).get("cells") or {}).get(workload, {}).get(str(c))


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """ours/peer: output tok/s (above 1x we win) and TTFT p50 (below 1x we win); and 2 vision replicas / 1."""
    out: dict[str, Any] = {}
    for name, mine, peer in (("ours/vllm", "ours", "vllm"), ("ours/transformers", "ours", "transformers"),
                             ("vision2/vision1", "ours-vision2", "ours")):
        for workload in WORKLOADS:
            for c in result["args"]["concurrency"]:
                ours, theirs = cell(result, mine, workload, c), cell(result, peer, workload, c)
                if not ours or not theirs or not theirs["output_token_throughput"] or not theirs["ttft_ms"]["p50"]:
                    continue
                out.setdefault(name, {}).setdefault(workload, {})[str(c)] = {
                    "output_tok_s": ours["output_token_throughput"] / theirs["output_token_throughput"],
                    "ttft_p50": ours["ttft_ms"]["p50"] / theirs["ttft_ms"]["p50"],
                }
    return out


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def main_table(result: dict[str, Any]) -> str:
    head = ("| workload | C | ours tok/s | vLLM tok/s | transformers tok/s | ours/vLLM tok/s | ours/transformers tok/s "
            "| ours TTFT p50 ms | vLLM TTFT p50 ms | transformers TTFT p50 ms (queued) | ours/vLLM TTFT | "
            "ours/transformers TTFT |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    r = result["ratios"]
    for workload in WORKLOADS:
        for c in result["args"]["concurrency"]:
            row = [cell(result, s, workload, c) for s in ("ours", "vllm", "transformers")]
            if not any(row):
                continue
            tps = [_fmt(x and x["output_token_throughput"]) for x in row]
            ttft = [_fmt(x and x["ttft_ms"]["p50"]) for x in row]
            rv = r.get("ours/vllm", {}).get(workload, {}).get(str(c))
            rt = r.get("ours/transformers", {}).get(workload, {}).get(str(c))
            fails = sum(x["failed"] for x in row if x)
            lines.append(f"| {workload} | {c}{f' ({fails} failed)' if fails else ''} | {' | '.join(tps)} | "
                         f"{_fmt(rv and rv['output_tok_s'], 2, 'x')} | {_fmt(rt and rt['output_tok_s'], 2, 'x')} | "
                         f"{' | '.join(ttft)} | {_fmt(rv and rv['ttft_p50'], 2, 'x')} | "
                         f"{_fmt(rt and rt['ttft_p50'], 2, 'x')} |")
    return "\n".join(lines)


def vision_table(result: dict[str, Any]) -> str:
    lines = ["| workload | C | 1 replica tok/s | 2 replicas tok/s | 2/1 tok/s | 1 replica TTFT p50 ms | "
             "2 replicas TTFT p50 ms | 2/1 TTFT |", "|---|---|---|---|---|---|---|---|"]
    for workload in IMAGE_WORKLOADS:
        for c in result["args"]["concurrency"]:
            one, two = cell(result, "ours", workload, c), cell(result, "ours-vision2", workload, c)
            if not one or not two:
                continue
            lines.append(f"| {workload} | {c} | {one['output_token_throughput']:.0f} | "
                         f"{two['output_token_throughput']:.0f} | "
                         f"{two['output_token_throughput'] / one['output_token_throughput']:.2f}x | "
                         f"{one['ttft_ms']['p50']:.0f} | {two['ttft_ms']['p50']:.0f} | "
                         f"{two['ttft_ms']['p50'] / one['ttft_ms']['p50']:.2f}x |")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------


def ensure_checkpoint(model: Path) -> None:
    if (model / "config.json").is_file():
        return
    subprocess.run([sys.executable, "-m", "runtime", "make-checkpoint", str(model), "--preset", "mla576",
                    "--seed", "0", "--dialect", "original"], cwd=str(ROOT), check=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("/tmp/cmp-ckpt"),
                    help="mla576, original layout (built if absent)")
    ap.add_argument("--quick", action="store_true", help="C = 1,4, max(4, C) requests, 3 for transformers")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--systems", default="ours,ours-vision2,vllm,transformers")
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests = max(min, this x C)")
    ap.add_argument("--input-len", type=int, default=64, help="random words per prompt")
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--image-size", default="224x224")
    ap.add_argument("--hf-requests", type=int, default=8, help="transformers requests timed per workload")
    ap.add_argument("--hf-threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.6, help="wait for the 1-min load average below this")
    ap.add_argument("--max-wait-s", type=float, default=240)
    ap.add_argument("--port", type=int, default=8123, help="ours; vLLM gets the next one")
    ap.add_argument("--kv-cache-mb", type=int, default=1024, help="ours (vLLM: VLLM_CPU_KVCACHE_SPACE=1 GiB)")
    ap.add_argument("--timeout-s", type=float, default=600, help="per request")
    ap.add_argument("--start-timeout-s", type=float, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.min_requests, args.hf_requests = "1,4", 4, 3
        args.requests_per_slot = min(args.requests_per_slot, 1)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}")
    return args


def run_system(args: argparse.Namespace, system: str) -> dict[str, Any]:
    if system == "ours":
        return run_ours(args, 1, args.workloads)
    if system == "ours-vision2":
        return run_ours(args, 2, [w for w in args.workloads if w in IMAGE_WORKLOADS])
    if system == "vllm":
        return run_vllm(args, args.workloads)
    if system == "transformers":
        return run_transformers(args, args.workloads)
    raise ValueError(f"unknown system {system!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_checkpoint(args.model)
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), "versions": versions(),
        "vllm": vllm_cpu.version() if "vllm" in args.systems else None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workloads": {w: {c: make_spec(args, w, c).__dict__ for c in args.concurrency} for w in args.workloads},
        "systems": {}, "load": {},
    }
    for system in args.systems:
        print(f"{system}:", file=sys.stderr)
        before = wait_for_quiet(args.max_load, args.max_wait_s)
        t0 = time.monotonic()
        try:
            result["systems"][system] = run_system(args, system)
        except Exception as e:  # noqa: BLE001 - one broken peer must not lose the others' numbers
            print(f"  {system} failed: {e!r}", file=sys.stderr)
            result["systems"][system] = {"error": f"{type(e).__name__}: {e}"[:4000]}
        result["load"][system] = {"before": before, "after": list(os.getloadavg()),
                                  "seconds": round(time.monotonic() - t0, 1)}
    result["ratios"] = ratios(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(main_table(result))
    print()
    print(vision_table(result))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
