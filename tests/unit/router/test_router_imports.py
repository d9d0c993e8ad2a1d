"""The router holds no tensors, so importing its replica module must not import torch (the
service modules, the DeepSeek model and the vision tower stay out of it)."""

from __future__ import annotations

import subprocess
import sys


def test_the_router_module_imports_no_torch() -> None:
    probe = "import sys, runtime.router.server; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
