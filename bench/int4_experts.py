"""INT4 routed experts on CPU: resident bytes against bf16/float32, forward time against float32
experts (the mla576 preset, and one layer at Kimi-K2.5's real expert shapes), the kernel choice
(dequantize into a scratch then F.linear, against torch's _weight_int4pack_mm_for_cpu), and the
whole engine's decode throughput on the mla576 checkpoint.

    .venv/bin/python bench/int4_experts.py                 # -> bench/results/int4_experts.json
    .venv/bin/python bench/int4_experts.py --threads 2 --out /tmp/int4.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.checkpoint.loader import load_language_model, routed_expert_bytes  # noqa: E402
from runtime.checkpoint.maker import init_random, make_checkpoint, model_config_of  # noqa: E402
from runtime.lm_service.offline import OfflineLLM  # noqa: E402
from runtime.models.config import TextConfig  # noqa: E402
from runtime.models.experts import DequantScratch, ExpertBank, Int4Layout, Int4RoutedExperts, RoutedExperts  # noqa: E402
from runtime.models.int4 import dequantize_int4, pack_int4, quantize_int4  # noqa: E402
from runtime.requests import SamplingParams  # noqa: E402
from runtime.settings import EngineConfig  # noqa: E402


def _ms(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of one call, in ms, after a warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _experts_pair(cfg: TextConfig, group: int) -> tuple[Int4RoutedExperts, RoutedExperts]:
    """INT4 experts from random weights, and float32 experts holding their dequantized weights."""
    dense = RoutedExperts(cfg)
    init_random(dense, torch.Generator().manual_seed(0))
    packed = Int4RoutedExperts(cfg, 0, cfg.n_routed_experts, Int4Layout(group), DequantScratch())
    with torch.no_grad():
        for proj in ("gate_up_proj", "down_proj"):
            q, scale = quantize_int4(getattr(dense, proj), group)
            packed.set_packed(proj, pack_int4(q), scale)
            getattr(dense, proj).copy_(dequantize_int4(*packed.packed(proj), group))
    return packed, dense


def _forward_ms(experts: ExpertBank, cfg: TextConfig, tokens: int, reps: int) -> float:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                       for _ in range(tokens)])
    w = torch.rand(tokens, cfg.num_experts_per_tok, generator=g)
    with torch.inference_mode():
        return _ms(lambda: experts(x, ids, w), reps)


def experts_forward(cfg: TextConfig, group: int, token_counts: list[int], reps: int) -> list[dict]:
    packed, dense = _experts_pair(cfg, group)
    rows = []
    for t in token_counts:
        int4, fp32 = _forward_ms(packed, cfg, t, reps), _forward_ms(dense, cfg, t, reps)
        rows.append({"tokens": t, "int4_ms": round(int4, 4), "float32_ms": round(fp32, 4),
                     "int4_over_float32": round(int4 / fp32, 2)})
        print(f"  T={t:4d}  int4 {int4:9.3f} ms  float32 {fp32:9.3f} ms  ratio {int4 / fp32:5.2f}", flush=True)
    return rows


def kernel_choice(out: int, inp: int, group: int, token_counts: list[int], reps: int) -> list[dict]:
    """One projection [out, in]: float32 F.linear; dequantize into a reused scratch, then F.linear
    (what Int4RoutedExperts does); torch's int4 CPU kernel with float32 activations."""
    q, scale = quantize_int4(torch.randn(out, inp, generator=torch.Generator().manual_seed(1)) * 0.02, group)
    packed, weight = pack_int4(q), q.float() * scale.float().repeat_interleave(group, dim=1)
    scratch, nibbles = torch.empty(out, inp), torch.empty(out, inp, dtype=torch.uint8)
    int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.int() + 8).contiguous(), 1)

    def torch_kernel(x: torch.Tensor) -> torch.Tensor:
        scale_zeros = torch.stack([scale.float().t(), torch.zeros(inp // group, out)], dim=-1)  # [in/g, out, 2]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4pack, group, scale_zeros)

    rows = []
    for t in token_counts:
        x = torch.randn(t, inp)
        row = {"tokens": t,
               "float32_linear_ms": _ms(lambda x=x: F.linear(x, weight), reps),
               "dequant_then_linear_ms": _ms(lambda x=x: F.linear(x, dequantize_int4(packed, scale, group, scratch,
                                                                                     nibbles)), reps),
               "torch_int4pack_mm_ms": _ms(lambda x=x: torch_kernel(x), reps),
               "torch_int4pack_max_abs_err": float((torch_kernel(x) - x @ weight.t()).abs().max())}
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print("  " + "  ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    return rows


def memory(root: Path) -> dict:
    int4 = make_checkpoint(root / "int4", "mla576", dialect="original", quantize="int4")
    dense = make_checkpoint(root / "dense", "mla576", dialect="original")
    out = {"int4_bytes": routed_expert_bytes(load_language_model(int4)),
           "bf16_bytes": routed_expert_bytes(load_language_model(dense, dtype=torch.bfloat16)),
           "float32_bytes": routed_expert_bytes(load_language_model(dense))}
    out["int4_over_bf16"] = round(out["int4_bytes"] / out["bf16_bytes"], 4)
    print(f"  mla576 routed experts: {out}", flush=True)
    return out


def engine_decode(root: Path, requests: int, tokens: int, rounds: int = 6) -> dict:
    """Tokens/s of the engine with `requests` concurrent text prompts: the INT4 checkpoint against the
    float32 one memory() wrote (same shapes and seed; only the experts' storage differs). Rounds
    alternate between the two and the best of each counts: the 2 shared cores are noisy."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    llms = {name: OfflineLLM(root / sub, EngineConfig(kv_cache_mb=64))
            for name, sub in (("int4", "int4"), ("float32", "dense"))}
    ids = llms["int4"].prompts.token_ids([{"role": "user", "content": "Count to a hundred, please."}], [])
    best = dict.fromkeys(llms, 0.0)
    for rnd in range(rounds + 1):  # round 0 warms up
        for name, llm in llms.items():
            start = time.perf_counter()
            for i in range(requests):
                llm.submit_ids(f"{rnd}-{i}", ids, params)
            made = sum(len(r.token_ids) for r in llm.run().values())
            if rnd:
                best[name] = max(best[name], made / (time.perf_counter() - start))
    out = {f"{name}_tokens_per_s": round(v, 1) for name, v in best.items()}
    out["int4_over_float32"] = round(best["int4"] / best["float32"], 2)
    print(f"  engine, {requests} requests x {tokens} tokens: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "int4_experts.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        print("memory", flush=True)
        result["memory"] = memory(Path(tmp))
        print("experts forward, mla576 (8 experts, top-2, hidden 128, I 64)", flush=True)
        result["mla576_experts"] = experts_forward(model_config_of("mla576", 64).text, 32, [1, 8, 64, 256], args.reps)
        real = dataclasses.replace(model_config_of("mla576", 64).text, hidden_size=7168, moe_intermediate_size=2048,
                                   n_routed_experts=2, num_experts_per_tok=2)
        print("experts forward, Kimi-K2.5 expert shapes (2 experts, hidden 7168, I 2048)", flush=True)
        result["k25_shape_experts"] = experts_forward(real, 32, [1, 8, 64], max(3, args.reps // 4))
        print("kernel choice, one [4096, 7168] projection", flush=True)
        result["kernel_choice"] = kernel_choice(4096, 7168, 32, [1, 2, 8, 64], max(3, args.reps // 4))
        result["engine"] = [engine_decode(Path(tmp), requests=c, tokens=32) for c in (16, 64)]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
