"""The router holds no tensors, so importing its replica module must not import torch (the
service modules, the DeepSeek model and the vision tower stay out of it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_router_module_imports_no_torch() -> None:
    probe = "import sys, runtime.router.server; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("tokenizer", ["tokenizers", "tiktoken"])
def test_a_started_router_holds_no_torch(checkpoints, tokenizer: str) -> None:
    """What the Router replica loads at start (the checkpoint's config, processor, chat template and
    tokenizer, the release's tiktoken one too) must not pull torch in either: transformers'
    AutoTokenizer does, through its model configuration classes."""
    path = checkpoints("tiny", tokenizer=tokenizer)
    probe = ("import sys; from runtime.router.prepare import RequestPreparer; "
             f"RequestPreparer({str(path)!r}, 'float32', trust_remote_code=True); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
