"""The engine's share of inter-token latency: a closed loop in-process, gaps timed in step CPU time.

    python bench/step_gaps.py                              # caps none,128,256,512 -> results/step_gaps.json
    python bench/step_gaps.py --caps 256 --concurrency 64

C requests run at once (128 random prompt tokens, 64 sampled tokens, ignore_eos, prefix caching off);
each finished request is replaced by a new one at the next step, as vLLM's bench client does at
--max-concurrency C, until --requests have run. Every step is timed in the step thread's CPU time
(time.thread_time, one torch thread), so other work on the machine barely moves the figures. A
stream's gap is the step time between two of its tokens: what its client would see as inter-token
latency if serving added nothing. Each cap is `engine.max_prefill_tokens_while_decoding`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.checkpoint.maker import make_checkpoint  # noqa: E402
from runtime.lm_service.loading import build_engine  # noqa: E402
from runtime.lm_service.request_state import EngineRequest  # noqa: E402
from runtime.protocol import SamplingParams  # noqa: E402
from runtime.settings import EngineConfig  # noqa: E402


def run(model: Path, cap: int | None, concurrency: int, requests: int, prompt_len: int, output_len: int) -> dict:
    engine = build_engine(model, EngineConfig(kv_cache_mb=1024, prefix_caching=False,
                                              max_prefill_tokens_while_decoding=cap))
    rng = random.Random(0)
    clock, added = 0.0, 0
    arrived: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []

    def add() -> None:
        nonlocal added
        ids = [t for t in (rng.randrange(10, 300) for _ in range(2 * prompt_len))
               if t != engine.model_config.image_token_id][:prompt_len]
        rid = f"r{added}"
        engine.add_request(EngineRequest(rid, ids, SamplingParams(max_tokens=output_len, temperature=1.0,
                                                                  ignore_eos=True)))
        arrived[rid], added = clock, added + 1

    for _ in range(concurrency):
        add()
    done = 0
    while done < requests:
        started = time.thread_time()
        outputs = engine.step()
        clock += (time.thread_time() - started) * 1e3
        for out in outputs:
            if out.token_ids:
                if out.request_id in first:
                    gaps.append(clock - last[out.request_id])
                else:
                    first[out.request_id] = clock
                last[out.request_id] = clock
            if out.finished:
                done += 1
                if added < requests:
                    add()
    engine.close()
    ttft = [first[r] - arrived[r] for r in first]
    return {"cap": cap, "tokens_per_cpu_s": round(requests * output_len / clock * 1e3),
            "gap_ms": {f"p{q}": round(float(np.percentile(gaps, q)), 1) for q in (50, 90, 99, 100)},
            "ttft_ms": {"mean": round(float(np.mean(ttft)), 1), "p99": round(float(np.percentile(ttft, 99)), 1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/tmp/cmp-ckpt"), help="mla576 checkpoint (built if absent)")
    p.add_argument("--caps", default="none,128,256,512")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_gaps.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not (args.model / "config.json").is_file():
        make_checkpoint(args.model, "mla576", seed=0, dialect="original")
    rows: list[dict[str, Any]] = []
    for cap in args.caps.split(","):
        rows.append(run(args.model, None if cap == "none" else int(cap), args.concurrency, args.requests,
                        args.prompt_len, args.output_len))
        print(json.dumps(rows[-1]), file=sys.stderr)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "args": {
        k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
