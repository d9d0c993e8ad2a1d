"""Load the vision tower or the language model from a Hugging Face style checkpoint directory.

Reads are memory-mapped (safetensors `safe_open`); an expert-parallel rank reads only its own
experts (a row slice of a fused tensor, or only its per-expert tensors). The config dialect and the
weight dialect are detected independently, because mixed directories exist.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime.checkpoint import names as N
from runtime.errors import (
    CheckpointError,
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedConfigError,
)
from runtime.models.config import ModelConfig, load_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM, MoEGate, RoutedExperts
from runtime.models.moonvit import VisionTower


class TensorIndex:
    """Tensor name -> safetensors file, for `model.safetensors`, a sharded index, or loose shards."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[Path, Any] = {}
        self.file_of: dict[str, Path] = self._build_map()

    def _build_map(self) -> dict[str, Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{index} is not a valid safetensors index: {e}") from e
            return {name: self.dir / file for name, file in weight_map.items()}
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.dir}")
        mapping: dict[str, Path] = {}
        for f in files:
            mapping.update(dict.fromkeys(self._open(f).keys(), f))
        return mapping

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptCheckpointError(f"cannot read {path.name}: {e}") from e
        return self._handles[path]

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def _handle(self, name: str, where: str) -> Any:
        if name not in self.file_of:
            raise MissingTensorError(name, where)
        return self._open(self.file_of[name])

    def get(self, name: str, where: str = "") -> torch.Tensor:
        try:
            return self._handle(name, where).get_tensor(name)
        except SafetensorError as e:
            raise CorruptCheckpointError(f"cannot read tensor {name!r}: {e}") from e

    def get_rows(self, name: str, start: int, stop: int, where: str = "") -> torch.Tensor:
        sl = self._handle(name, where).get_slice(name)
        rows = sl.get_shape()[0]
        if stop > rows:
            raise ShapeMismatchError(name, (stop, *sl.get_shape()[1:]), tuple(sl.get_shape()))
        return sl[start:stop]


# --- reading one parameter ---------------------------------------------------------------------


def _read(index: TensorIndex, src: N.Source, param: str) -> tuple[torch.Tensor, list[str]]:
    """Build one parameter's tensor; also return the checkpoint names it consumed."""
    if isinstance(src, N.Direct):
        return index.get(src.name, f"for {param}"), [src.name]
    if isinstance(src, N.RowSlice):
        return index.get_rows(src.name, src.start, src.stop, f"for {param}"), [src.name]
    if isinstance(src, N.QkvPart):
        fused = index.get(src.name, f"for {param}")
        if fused.shape[0] % 3:
            raise ShapeMismatchError(src.name, (3 * (fused.shape[0] // 3), *fused.shape[1:]), tuple(fused.shape))
        part = fused.chunk(3, dim=0)[src.index]
        if src.rope_heads is not None:
            part = N.interleaved_to_halves(part, src.rope_heads)
        return part, [src.name]
    experts = [torch.cat([index.get(n, f"for {param}") for n in group]) for group in src.names]
    return torch.stack(experts), [n for group in src.names for n in group]


def _load_into(module: nn.Module, plan: dict[str, N.Source], index: TensorIndex) -> set[str]:
    consumed: set[str] = set()
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            tensor, used = _read(index, plan[name], name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ShapeMismatchError(used[0], tuple(target.shape), tuple(tensor.shape))
            target.copy_(tensor.to(target.dtype))
            consumed.update(used)
    return consumed


def _check_unexpected(index: TensorIndex, belongs: Iterable[str], accounted: set[str]) -> None:
    extra = sorted(n for n in belongs if n not in accounted)
    if extra:
        raise UnexpectedTensorError(extra)


def weight_dialect(index: TensorIndex) -> N.WeightDialect:
    dialect = N.detect_weight_dialect(index.names)
    if dialect is None:
        raise UnsupportedConfigError(
            "cannot tell the checkpoint layout: no 'language_model.*' or 'model.language_model.*' tensors"
        )
    return dialect


# --- public API --------------------------------------------------------------------------------


def load_vision(
    model_dir: str | Path, cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> VisionTower:
    cfg = cfg or load_model_config(model_dir)
    index = TensorIndex(model_dir)
    dialect = weight_dialect(index)
    model = VisionTower(cfg.vision, cfg.text.hidden_size).to(dtype)
    plan = N.plan_vision(list(model.state_dict()), dialect, cfg.vision.num_attention_heads)
    consumed = _load_into(model, plan, index)
    prefixes: tuple[str, ...] = ("vision_tower.", "mm_projector.")
    if dialect == "transformers":
        prefixes = tuple("model." + p for p in prefixes)
    _check_unexpected(index, (n for n in index.names if n.startswith(prefixes)), consumed)
    return model.to(device).eval()


def load_language_model(
    model_dir: str | Path,
    cfg: ModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    expert_range: tuple[int, int] | None = None,
) -> DeepseekV3LM:
    """Load the LM; with expert_range=(first, count) only those routed experts are read and held."""
    cfg = cfg or load_model_config(model_dir)
    text = cfg.text
    first, count = expert_range or (0, text.n_routed_experts)
    if first < 0 or count < 1 or first + count > text.n_routed_experts:
        raise ValueError(f"expert range {(first, count)} is outside 0..{text.n_routed_experts}")
    index = TensorIndex(model_dir)
    dialect = weight_dialect(index)
    _reject_quantized(cfg)
    model = DeepseekV3LM(text, cfg.tie_word_embeddings, (first, count)).to(dtype)
    _keep_gate_bias_fp32(model)
    plan = N.plan_lm(list(model.state_dict()), dialect, (first, count))
    consumed = _load_into(model, plan, index)
    accounted = consumed | _skipped_lm_tensors(cfg, dialect)
    prefixes = ("language_model.",) if dialect == "original" else ("model.language_model.", "lm_head.")
    belongs = (n for n in index.names if n.startswith(prefixes) and not _is_extra_layer(n, text.num_hidden_layers))
    _check_unexpected(index, belongs, accounted)
    return model.to(device).eval()


def load_routed_experts(
    model_dir: str | Path, cfg: ModelConfig, expert_range: tuple[int, int], dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[int, RoutedExperts]:
    """Only the routed experts [first, first + count) of every MoE layer: what an expert-parallel
    worker rank holds (attention, dense layers and the rest stay on rank 0)."""
    text = cfg.text
    index = TensorIndex(model_dir)
    dialect = weight_dialect(index)
    _reject_quantized(cfg)
    out: dict[int, RoutedExperts] = {}
    for layer in range(text.num_hidden_layers):
        if not text.is_moe_layer(layer):
            continue
        experts = RoutedExperts(text, *expert_range).to(dtype)
        names = [f"layers.{layer}.mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")]
        plan = N.plan_lm(names, dialect, expert_range)
        with torch.no_grad():
            for name, param in zip(names, (experts.gate_up_proj, experts.down_proj), strict=True):
                tensor, used = _read(index, plan[name], name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ShapeMismatchError(used[0], tuple(param.shape), tuple(tensor.shape))
                param.copy_(tensor.to(dtype))
        out[layer] = experts.to(device).eval()
    return out


def _skipped_lm_tensors(cfg: ModelConfig, dialect: N.WeightDialect) -> set[str]:
    """Tensors we knowingly do not read: other ranks' experts, and lm_head when it is tied."""
    skipped = {N.lm_name("lm_head.weight", dialect)} if cfg.tie_word_embeddings else set()
    for layer in range(cfg.text.num_hidden_layers):
        if cfg.text.is_moe_layer(layer):
            skipped.update(N.all_expert_tensor_names(layer, cfg.text.n_routed_experts, dialect))
    return skipped


_LAYER = re.compile(r"layers\.(\d+)\.")


def _is_extra_layer(name: str, num_layers: int) -> bool:
    """Multi-token-prediction layers past num_hidden_layers: present in some releases, unused here."""
    m = _LAYER.search(name)
    return m is not None and int(m.group(1)) >= num_layers


def _keep_gate_bias_fp32(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoEGate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()


def _reject_quantized(cfg: ModelConfig) -> None:
    quant = cfg.quantization
    if quant:
        raise UnsupportedConfigError(
            f"quantization_config ({quant.get('quant_method', '?')}/{quant.get('format', '?')}) is not supported yet"
        )


def routed_expert_bytes(model: nn.Module) -> int:
    """Bytes this process holds for routed experts (what expert parallelism divides)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".mlp.experts." in n)
