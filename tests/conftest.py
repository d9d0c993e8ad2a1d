"""Test-session setup: thread limits, the reference-only torchvision, shared checkpoint fixtures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# torchvision lives outside the runtime's environment (scripts/test.sh puts it here) so that the
# runtime provably never needs it; only this test process adds it, before transformers is imported.
REFERENCE_EXTRAS = Path(os.environ.get("KIMI_REFERENCE_EXTRAS", ROOT / ".venv-ref"))
if REFERENCE_EXTRAS.is_dir():
    sys.path.insert(0, str(REFERENCE_EXTRAS))
    from tests.reference import install_torchvision_shim

    install_torchvision_shim()

torch.set_num_threads(int(os.environ.get("KIMI_TEST_THREADS", "2")))
torch.manual_seed(0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """make(preset, dialect, **kw) -> path, built once per session and argument set."""
    from runtime.checkpoint.maker import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[tuple, Path] = {}

    def make(preset: str = "tiny", dialect: str = "transformers", seed: int = 0, **kw) -> Path:
        key = (preset, dialect, seed, tuple(sorted(kw.items())))
        if key not in built:
            name = "-".join([preset, dialect, str(seed), *(f"{k}={v}" for k, v in sorted(kw.items()))])
            built[key] = make_checkpoint(root / name, preset, seed, dialect, **kw)  # type: ignore[arg-type]
        return built[key]

    return make


@pytest.fixture(scope="session")
def int4_checkpoints(checkpoints, tmp_path_factory: pytest.TempPathFactory):
    """make(preset, dialect) -> (INT4 checkpoint, its dequantized float32 twin), once per session."""
    from tests.reference import write_dequantized_twin

    root = tmp_path_factory.mktemp("int4-twins")
    built: dict[tuple[str, str], tuple[Path, Path]] = {}

    def make(preset: str = "tiny", dialect: str = "transformers") -> tuple[Path, Path]:
        if (preset, dialect) not in built:
            int4 = checkpoints(preset, dialect, quantize="int4")
            built[preset, dialect] = (int4, write_dequantized_twin(int4, root / f"{preset}-{dialect}"))
        return built[preset, dialect]

    return make
