"""Greedy parity: our runtime's offline CLI vs vLLM's CPU build on the same checkpoint.

    python bench/peers/parity_vllm.py --model /tmp/vllm-ckpt [--port 8012] [--max-tokens 16]

Sends the same OpenAI chat bodies (temperature 0, ignore_eos, logprobs) to
`python -m runtime generate` and to vLLM (started with bench/peers/vllm_cpu.py), then compares
prompt token counts, generated token ids and the chosen tokens' logprobs. Prints one JSON summary;
exits 1 if any text-only request's token ids differ.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_cpu  # noqa: E402

RUNTIME_PYTHON = os.environ.get("RUNTIME_PYTHON", "/work/venv/bin/python")
REPO = Path(__file__).resolve().parents[2]

TEXT_PROMPTS = [
    "Hello, who are you?",
    "Write a haiku about the sea.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "The quick brown fox jumps over the lazy dog. " * 8,
]


def bodies(max_tokens: int, with_image: bool) -> list[dict]:
    out = []
    for p in TEXT_PROMPTS:
        out.append({"messages": [{"role": "user", "content": p}]})
    out.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
    if with_image:
        out.append(vllm_cpu.check_body("x"))
        out[-1].pop("model")
    for b in out:
        b.update(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=True)
    return out


def run_runtime(model: str, reqs: list[dict]) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        src.write_text("".join(json.dumps({k: v for k, v in b.items() if k != "return_token_ids"}) + "\n"
                               for b in reqs))
        subprocess.run([RUNTIME_PYTHON, "-m", "runtime", "generate", "--model", model,
                        "--requests", str(src), "--output", str(dst), "--dtype", "float32"],
                       check=True, cwd=str(REPO))
        return [json.loads(line) for line in dst.read_text().splitlines() if line.strip()]


def _chosen_logprobs(lp) -> list[float] | None:
    if not lp:
        return None
    # ours: [{"token_id", "logprob", "top"}, ...]; vLLM (OpenAI): {"content": [{"token", "logprob", ...}]}
    content = lp.get("content") if isinstance(lp, dict) else lp
    if not content:
        return None
    return [float(c["logprob"]) for c in content]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--no-image", action="store_true")
    args = ap.parse_args()

    reqs = bodies(args.max_tokens, not args.no_image)
    ours = run_runtime(args.model, reqs)

    proc = vllm_cpu.start(args.model, args.port)
    try:
        theirs = []
        for b in reqs:
            status, resp = vllm_cpu.chat(args.port, {**b, "model": proc.model_name, "return_token_ids": True})
            if status != 200:
                raise RuntimeError(f"vLLM answered {status}: {resp}")
            theirs.append(resp)
    finally:
        vllm_cpu.stop(proc)

    rows, text_ok = [], True
    for i, (b, o, t) in enumerate(zip(reqs, ours, theirs, strict=True)):
        has_image = not isinstance(b["messages"][-1]["content"], str)
        ch = t["choices"][0]
        ids_o, ids_t = o.get("token_ids"), ch.get("token_ids")
        same = ids_o == ids_t
        first_diff = next((k for k, (a, c) in enumerate(zip(ids_o or [], ids_t or [], strict=False)) if a != c), None)
        lo, lt = _chosen_logprobs(o.get("logprobs")), _chosen_logprobs(ch.get("logprobs"))
        max_lp = (max(abs(a - c) for a, c in zip(lo, lt, strict=False)) if lo and lt and same else None)
        rows.append({
            "request": i, "image": has_image,
            "prompt_tokens": [o.get("usage", {}).get("prompt_tokens"), t["usage"]["prompt_tokens"]],
            "same_token_ids": same, "first_diff_at": first_diff,
            "runtime_ids": ids_o, "vllm_ids": ids_t,
            "max_abs_logprob_diff": max_lp,
        })
        if not has_image and not same:
            text_ok = False
    print(json.dumps({"vllm": vllm_cpu.version()["vllm"], "text_only_identical": text_ok, "rows": rows}, indent=1))
    return 0 if text_ok else 1


if __name__ == "__main__":
    sys.exit(main())
