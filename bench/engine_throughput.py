"""Engine throughput and TTFT at 1/4/16/64 concurrent requests vs transformers `generate`, in one run.

    python bench/engine_throughput.py [--model DIR | --preset tiny] [--out bench/results/engine.json]

Every request has the same shape: a random-text prompt (and, with --images 1, one image), then
exactly --output-tokens greedy tokens (ignore_eos). Ours: all C requests submitted at once to the
engine (continuous batching). Transformers: the same prompts through `generate`, one after the
other (its usual offline use), timed on --hf-requests of them; its throughput does not depend on C,
and its TTFT under C concurrent arrivals is the queueing it implies (request k waits for k earlier
ones). Ratios come from the same run on the same machine; absolute numbers are noisy on shared CPUs.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.checkpoint.maker import make_checkpoint  # noqa: E402
from runtime.lm_service.offline import OfflineLLM  # noqa: E402
from runtime.requests import ChatRequest, SamplingParams  # noqa: E402
from runtime.settings import EngineConfig  # noqa: E402
from runtime.vision_service.preprocess import decode_image, preprocess_batch  # noqa: E402


def _png(seed: int, size: tuple[int, int] = (140, 112)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _requests(n: int, words: int, images: int, output_tokens: int, seed: int) -> list[ChatRequest]:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "apple", "orange", "green"]
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    out = []
    for i in range(n):
        imgs = [_png(seed * 10_000 + i * 10 + k) for k in range(images)]
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": f"<image {k}>"}} for k in range(images)]
        parts.append({"type": "text", "text": " ".join(rng.choice(vocab) for _ in range(words))})
        out.append(ChatRequest([{"role": "user", "content": parts}], imgs, params))
    return out


def run_ours(llm: OfflineLLM, requests: list[ChatRequest]) -> dict:
    start = time.perf_counter()
    first: dict[str, float] = {}
    for i, r in enumerate(requests):
        llm.submit(f"b{i}", r)
    while llm.engine.has_unfinished():
        for out in llm.step():
            if out.token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter() - start
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in llm.run().values())
    return {"wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_mean_s": statistics.mean(first.values()), "ttft_p99_s": _p99(list(first.values()))}


def run_transformers(model_dir: Path, llm: OfflineLLM, requests: list[ChatRequest]) -> dict:
    from transformers import Kimi_K25ForConditionalGeneration

    model = Kimi_K25ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    times, ttfts, tokens = [], [], 0
    for r in requests:
        inputs = _hf_inputs(llm, r)
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            ttfts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=r.sampling.max_tokens, min_new_tokens=r.sampling.max_tokens,
                                 do_sample=False)
            times.append(time.perf_counter() - t0)
        tokens += out.shape[1] - inputs["input_ids"].shape[1]
    per_request = statistics.mean(times)
    return {"requests_timed": len(requests), "tokens_per_s": tokens / sum(times), "request_s": per_request,
            "ttft_alone_s": statistics.mean(ttfts), "version": __import__("transformers").__version__}


def _hf_inputs(llm: OfflineLLM, r: ChatRequest) -> dict:
    decoded = [decode_image(b) for b in r.images]
    ids = llm.prompts.token_ids(r.messages, [(im.height, im.width) for im in decoded])
    inputs: dict = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if decoded:
        pixels, grids = preprocess_batch(decoded, llm.processor)
        inputs["pixel_values"] = pixels
        inputs["image_grid_thw"] = torch.tensor([[1, h, w] for h, w in grids])
    return inputs


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def _queued_ttft(hf: dict, concurrency: int) -> float:
    """Mean TTFT when C requests arrive together and are served one after the other."""
    return statistics.mean(k * hf["request_s"] + hf["ttft_alone_s"] for k in range(concurrency))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--ep-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or make_checkpoint(ROOT / "checkpoints" / f"bench-{args.preset}", args.preset, seed=0)

    # Prefix caching off: every request must compute its own prompt, as transformers does.
    llm = OfflineLLM(model_dir, EngineConfig(prefix_caching=False, ep_size=args.ep_size, max_num_seqs=64))
    levels = [int(c) for c in args.concurrency.split(",")]
    run_ours(llm, _requests(2, args.prompt_words, args.images, 4, seed=99))  # warm-up
    rows = []
    for c in levels:
        ours = run_ours(llm, _requests(c, args.prompt_words, args.images, args.output_tokens, seed=c))
        rows.append({"concurrency": c, "ours": ours})
        print(f"ours  C={c:3d}: {ours['tokens_per_s']:8.1f} tok/s, TTFT {ours['ttft_mean_s'] * 1e3:7.1f} ms",
              file=sys.stderr)
    llm.close()
    hf = run_transformers(model_dir, llm, _requests(args.hf_requests, args.prompt_words, args.images,
                                                    args.output_tokens, seed=1234))
    print(f"transformers sequential: {hf['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    for row in rows:
        c, ours = row["concurrency"], row["ours"]
        row["transformers_ttft_mean_s"] = _queued_ttft(hf, c)
        row["throughput_ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"]
        row["ttft_ratio"] = row["transformers_ttft_mean_s"] / ours["ttft_mean_s"]
    report = {"model_dir": str(model_dir), "args": {k: str(v) for k, v in vars(args).items()},
              "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
              "transformers": hf, "levels": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


def table(report: dict) -> str:
    lines = ["| concurrency | ours tok/s | transformers tok/s | throughput ratio | ours TTFT ms | "
             "transformers TTFT ms (queued) | TTFT ratio |", "|---|---|---|---|---|---|---|"]
    hf = report["transformers"]
    for row in report["levels"]:
        lines.append(f"| {row['concurrency']} | {row['ours']['tokens_per_s']:.0f} | {hf['tokens_per_s']:.0f} | "
                     f"{row['throughput_ratio']:.1f}x | {row['ours']['ttft_mean_s'] * 1e3:.0f} | "
                     f"{row['transformers_ttft_mean_s'] * 1e3:.0f} | {row['ttft_ratio']:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
