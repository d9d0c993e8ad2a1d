"""Real clients against our server, unchanged: vLLM's `vllm bench serve` and lm-eval's CLI.

    python bench/client_compat.py          # -> results/client_compat.json (about 3 min on 2 cores)

Starts `python -m runtime serve --model <tiny checkpoint> --port P` (the checkpoint named by its
path, as vLLM names a model), then runs, each from its own environment:
- `vllm bench serve` (vLLM's venv, `peers/_vllm_entry.py cli bench serve`) with `--model <path>` and
  no --served-model-name, once with `--backend vllm` (/v1/completions) and once with
  `--backend openai-chat` (/v1/chat/completions): random dataset, short prompts and answers;
- `lm_eval` (this venv's console script) as the Kimi-K2.5 deployment guide runs it (local-completions,
  num_concurrent=64, tokenized_requests=False, trust_remote_code=True, --num_fewshot 3), on a
  gsm8k-shaped task over a local JSONL file instead of gsm8k (no network here).
Records completed/failed per client and every warning line the clients printed, then stops the
server (SIGTERM to its PID, then waits). This is not a CI test: the vLLM venv is too heavy for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import compare  # noqa: E402
from bench.peers import vllm_cpu  # noqa: E402
from runtime.router import launch  # noqa: E402

BACKENDS = {"vllm": "/v1/completions", "openai-chat": "/v1/chat/completions"}
LM_EVAL = Path(sys.executable).with_name("lm_eval")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def responses(base_url: str) -> dict[str, int]:
    """The router's answers so far by HTTP status (completions and chat requests)."""
    with urllib.request.urlopen(f"{base_url}/stats", timeout=30) as r:
        return json.loads(r.read())["router"]["responses"]


def warnings(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if "warn" in line.lower()]


def vllm_bench(base_url: str, model: Path, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="client-compat-") as tmp:
        cmd = [vllm_cpu.VLLM_PYTHON, str(vllm_cpu.ENTRY), "cli", "bench", "serve", "--backend", backend,
               "--endpoint", BACKENDS[backend], "--base-url", base_url, "--model", str(model),
               "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
               "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", tmp,
               "--result-filename", "result.json"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=vllm_cpu.environment(None), cwd=tmp,
                              timeout=900)
        result = Path(tmp) / "result.json"
        raw = json.loads(result.read_text()) if result.exists() else {}
    shown = [c if c != tmp else "<result-dir>" for c in cmd]
    return {"command": " ".join(shown), "returncode": done.returncode, "completed": raw.get("completed"),
            "failed": raw.get("failed"), "total_input_tokens": raw.get("total_input_tokens"),
            "total_output_tokens": raw.get("total_output_tokens"),
            "errors": sorted(set(raw.get("errors") or []) - {""}),
            "warnings": warnings(done.stdout + done.stderr)}


def gsm8k_like_task(folder: Path, docs: int) -> None:
    """gsm8k's shape (question, answer ending in '#### N', 'Question: ... Answer:' prompts, the
    strict-match regex filter), over a local JSONL file."""
    rows = [{"question": f"Tom has {a} apples and buys {a + 3} more. How many apples does he have?",
             "answer": f"He has {a} + {a + 3} = {2 * a + 3} apples.\n#### {2 * a + 3}"} for a in range(docs)]
    data = folder / "client_gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "client_gsm8k", "dataset_path": "json", "test_split": "test", "fewshot_split": "test",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "hf-cache")},
            "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_target": "{{answer}}", "target_delimiter": " ", "fewshot_delimiter": "\n\n",
            "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                  "temperature": 0.0, "max_gen_toks": 16},
            "filter_list": [{"name": "strict-match", "filter": [
                {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    (folder / "client_gsm8k.yaml").write_text(yaml.safe_dump(task, sort_keys=False))


def lm_eval_cli(base_url: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="client-compat-lm-eval-") as tmp:
        folder = Path(tmp)
        gsm8k_like_task(folder, args.lm_eval_docs)
        model_args = (f"model={model},base_url={base_url}/v1/completions,num_concurrent=64,max_retries=3,"
                      "tokenized_requests=False,trust_remote_code=True")
        cmd = [str(LM_EVAL), "--model", "local-completions", "--model_args", model_args, "--tasks", "client_gsm8k",
               "--include_path", str(folder), "--num_fewshot", "3", "--output_path", str(folder / "out")]
        env = {**os.environ, **OFFLINE}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
        found = sorted((folder / "out").rglob("results_*.json"))
        raw = json.loads(found[-1].read_text()) if found else {}
    result = raw.get("results", {}).get("client_gsm8k", {})
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    return {"command": " ".join(c.replace(tmp, "<tasks>") for c in cmd), "returncode": done.returncode,
            "documents": raw.get("n-samples", {}).get("client_gsm8k", {}).get("effective"),
            "exact_match_strict": result.get("exact_match,strict-match"), "table": table,
            "warnings": warnings(done.stdout + done.stderr)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("/tmp/client-compat/tiny"),
                   help="tiny checkpoint (built if absent)")
    p.add_argument("--port", type=int, default=8350)
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--lm-eval-docs", type=int, default=20)
    p.add_argument("--start-timeout-s", type=float, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "client_compat.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "runtime", "make-checkpoint", str(args.model), "--preset", "tiny",
                        "--seed", "0"], cwd=str(ROOT), check=True)
    port = compare.free_port(args.port)
    log_path = Path(tempfile.gettempdir()) / f"client-compat-{port}.log"
    proc = compare.start_ours(SimpleNamespace(model=args.model, start_timeout_s=args.start_timeout_s), port,
                              launch.DEFAULT_CONFIG, log_path)
    base_url = f"http://127.0.0.1:{port}"
    clients: dict[str, Any] = {}
    runs = {f"vllm bench serve --backend {b}": lambda b=b: vllm_bench(base_url, args.model, b, args)
            for b in BACKENDS}
    runs["lm_eval local-completions"] = lambda: lm_eval_cli(base_url, args.model, args)
    try:
        for name, run in runs.items():
            before = responses(base_url)
            clients[name] = run()
            after = responses(base_url)
            # What the server answered this client (a client's retries would show up here).
            clients[name]["server_responses"] = {code: n - before.get(code, 0) for code, n in after.items()
                                                 if n != before.get(code, 0)}
    finally:
        compare.stop_ours(proc)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "server": " ".join(proc.cmd),  # type: ignore[attr-defined]
              "server_log": str(log_path), "versions": {"vllm": vllm_cpu.version().get("vllm"),
                                                        **compare.versions()}, "clients": clients}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, c in clients.items():
        print(f"{name}: rc {c['returncode']}, completed {c.get('completed', c.get('documents'))}, "
              f"failed {c.get('failed')}, server answered {c['server_responses']}, warnings {len(c['warnings'])}")
    ok = all(c["returncode"] == 0 and not c.get("failed") and set(c["server_responses"]) == {"200"}
             for c in clients.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
