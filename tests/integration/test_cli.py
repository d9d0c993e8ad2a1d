"""The command line as a user runs it: make-checkpoint, then generate over a JSONL file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtime.cli import sample_image_data_url


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "runtime", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_make_checkpoint_then_generate(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    made = _run("make-checkpoint", str(ckpt), "--preset", "odd", "--seed", "3", "--dialect", "original")
    assert made.returncode == 0, made.stderr
    image = {"type": "image_url", "image_url": {"url": sample_image_data_url()}}
    requests = [
        {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
         "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 6, "temperature": 0.8,
         "seed": 11, "top_k": 20, "top_p": 0.9, "min_p": 0.01},
        {"messages": [{"role": "user", "content": "oops"}], "top_p": 7},
        {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 40, "temperature": 0,
         "chat_template_kwargs": {"thinking": False}, "stop": ["e"]},
    ]
    lines = [json.dumps(r) for r in requests]
    lines.insert(2, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for out, ep_size in (("a.jsonl", "1"), ("b.jsonl", "2")):
        done = _run("generate", "--model", str(ckpt), "--requests", str(tmp_path / "in.jsonl"),
                    "--output", str(tmp_path / out), "--ep-size", ep_size)
        assert done.returncode == 0, done.stderr
    results = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(results) == 5

    image_answer, sampled, bad_json, bad_field, stopped = results
    assert image_answer["finish_reason"] == "length" and len(image_answer["token_ids"]) == 8
    assert image_answer["usage"]["prompt_tokens"] > 12  # the image's 12 placeholders are in the prompt
    assert image_answer["usage"]["total_tokens"] == image_answer["usage"]["prompt_tokens"] + 8
    assert len(sampled["token_ids"]) <= 6 and sampled["finish_reason"] in ("stop", "length")
    assert "invalid JSON" in bad_json["error"]["message"]
    assert bad_field["error"]["param"] == "top_p" and bad_field["error"]["type"] == "invalid_request_error"
    assert "e" not in stopped["text"]
    assert stopped["finish_reason"] == "stop" or len(stopped["token_ids"]) == 40
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text(), "runs repeat, with 1 or 2 EP ranks"


def test_bad_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("")
    done = _run("generate", "--model", str(tmp_path), "--requests", str(tmp_path / "in.jsonl"),
                "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 2 and "no config.json" in done.stderr


def test_release_tokenizer_format_runs_only_with_trust_remote_code(tmp_path: Path) -> None:
    ckpt = tmp_path / "release"
    made = _run("make-checkpoint", str(ckpt), "--tokenizer", "tiktoken")
    assert made.returncode == 0 and (ckpt / "tiktoken.model").is_file(), made.stderr
    request = {"messages": [{"role": "user", "content": "这是什么？ 👋"}], "max_tokens": 4, "temperature": 0}
    (tmp_path / "in.jsonl").write_text(json.dumps(request) + "\n")
    command = ("generate", "--model", str(ckpt), "--requests", str(tmp_path / "in.jsonl"),
               "--output", str(tmp_path / "out.jsonl"))
    refused = _run(*command)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "trust_remote_code: true" in refused.stderr and "--trust-remote-code" in refused.stderr
    served = _run("serve", "--model", str(ckpt))  # refused by the config check, before Ray starts
    assert served.returncode == 2 and "--trust-remote-code" in served.stderr and "Traceback" not in served.stderr
    done = _run(*command, "--trust-remote-code")
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "out.jsonl").read_text())["token_ids"]) == 4


def test_int4_checkpoint_as_released_then_generate(tmp_path: Path) -> None:
    """The release's layout (INT4 experts, bfloat16 rest) from the CLI, served in float32 on one rank
    and in bfloat16 on two expert-parallel ranks."""
    ckpt = tmp_path / "ckpt"
    made = _run("make-checkpoint", str(ckpt), "--preset", "tiny", "--dialect", "original", "--dtype", "bfloat16",
                "--quantize", "int4")
    assert made.returncode == 0, made.stderr
    assert "INT4 routed experts" in made.stdout
    request = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 7, "temperature": 0,
               "ignore_eos": True}
    (tmp_path / "in.jsonl").write_text(json.dumps(request) + "\n")
    for out, dtype, ep_size in (("a.jsonl", "float32", "1"), ("b.jsonl", "bfloat16", "2")):
        done = _run("generate", "--model", str(ckpt), "--requests", str(tmp_path / "in.jsonl"),
                    "--output", str(tmp_path / out), "--dtype", dtype, "--ep-size", ep_size)
        assert done.returncode == 0, done.stderr
        assert len(json.loads((tmp_path / out).read_text())["token_ids"]) == 7
