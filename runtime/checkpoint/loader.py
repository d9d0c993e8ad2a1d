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
    DtypeMismatchError,
    MissingTensorError,
    QuantizedTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedConfigError,
)
from runtime.models.config import ModelConfig, load_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM, MoEGate
from runtime.models.experts import ExpertBank, Int4Layout, Int4RoutedExperts, expert_factory
from runtime.models.int4 import COMPANIONS, check_packed
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
    state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, src in plan.items():
            target = state[name]
            tensor, used = _read(index, src, name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ShapeMismatchError(used[0], tuple(target.shape), tuple(tensor.shape))
            if tensor.is_floating_point() != target.is_floating_point():  # an integer tensor is no weight
                raise DtypeMismatchError(used[0], "a floating-point tensor" if target.is_floating_point()
                                         else str(target.dtype), str(tensor.dtype))
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
    int4 = _int4_layout(cfg, index)
    model = DeepseekV3LM(text, cfg.tie_word_embeddings, (first, count), int4).to(dtype)
    _keep_gate_bias_fp32(model)
    packed = {name: m for name, m in model.named_modules() if isinstance(m, Int4RoutedExperts)}
    float_names = [n for n in model.state_dict() if n.rsplit(".", 1)[0] not in packed]
    consumed = _load_into(model, N.plan_lm(float_names, dialect, (first, count)), index)
    for name, experts in packed.items():
        consumed |= _load_packed(index, experts, int(name.split(".")[1]), dialect, cfg)
    accounted = consumed | _skipped_lm_tensors(cfg, dialect, int4 is not None)
    prefixes = ("language_model.",) if dialect == "original" else ("model.language_model.", "lm_head.")
    belongs = (n for n in index.names if n.startswith(prefixes) and not _is_extra_layer(n, text.num_hidden_layers))
    _check_unexpected(index, belongs, accounted)
    return model.to(device).eval()


def load_routed_experts(
    model_dir: str | Path, cfg: ModelConfig, expert_range: tuple[int, int], dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> dict[int, ExpertBank]:
    """Only the routed experts [first, first + count) of every MoE layer: what an expert-parallel
    worker rank holds (attention, dense layers and the rest stay on rank 0). INT4 experts stay packed."""
    text = cfg.text
    index = TensorIndex(model_dir)
    dialect = weight_dialect(index)
    int4 = _int4_layout(cfg, index)
    make_experts = expert_factory(text, int4)
    out: dict[int, ExpertBank] = {}
    for layer in range(text.num_hidden_layers):
        if not text.is_moe_layer(layer):
            continue
        experts = make_experts(*expert_range).to(dtype)
        if isinstance(experts, Int4RoutedExperts):
            _load_packed(index, experts, layer, dialect, cfg)
        else:
            plan = N.plan_lm([f"layers.{layer}.mlp.experts.{p}" for p in _PARTS], dialect, expert_range)
            _load_into(experts, {name.rsplit(".", 1)[1]: src for name, src in plan.items()}, index)  # module's names
        out[layer] = experts.to(device).eval()
    return out


def _skipped_lm_tensors(cfg: ModelConfig, dialect: N.WeightDialect, packed: bool) -> set[str]:
    """Tensors we knowingly do not read: other ranks' experts, and lm_head when it is tied."""
    skipped = {N.lm_name("lm_head.weight", dialect)} if cfg.tie_word_embeddings else set()
    suffixes = COMPANIONS if packed else ()
    for layer in range(cfg.text.num_hidden_layers):
        if cfg.text.is_moe_layer(layer):
            skipped.update(N.all_expert_tensor_names(layer, cfg.text.n_routed_experts, dialect, suffixes))
    return skipped


# --- INT4 routed experts -----------------------------------------------------------------------

_PACKED_EXPERT = re.compile(r"layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight_packed$")
_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _int4_layout(cfg: ModelConfig, index: TensorIndex) -> Int4Layout | None:
    """How the routed experts are stored: packed INT4 (their layout) or float (None). Decided by the
    tensors, not only the config: a quantization_config may cover modules stored unquantized."""
    packed = sorted(n for n in index.names if n.endswith(".weight_packed"))
    stray = [n for n in packed if not _PACKED_EXPERT.search(n)]
    if stray:
        raise QuantizedTensorError(stray[0], "only routed experts may be stored INT4 in this runtime")
    if not packed:
        return None
    if cfg.int4 is None:
        raise QuantizedTensorError(packed[0], "is packed, but config.json has no quantization_config")
    scale = packed[0].replace(".weight_packed", ".weight_scale")
    if scale not in index.file_of:
        raise QuantizedTensorError(scale, "missing: packed weights need weight_packed, weight_scale, weight_shape")
    return Int4Layout(cfg.int4.group_size, index.get(scale).dtype)


def _load_packed(
    index: TensorIndex, experts: Int4RoutedExperts, layer: int, dialect: N.WeightDialect, cfg: ModelConfig
) -> set[str]:
    """Read, check and stack this rank's packed experts of one layer; return the tensors consumed."""
    consumed: set[str] = set()
    scale_dtype = experts.packed("down_proj")[1].dtype
    for proj, parts in _PARTS.items():
        out, inp = experts.shapes[proj]
        per_expert = []
        for e in range(experts.first, experts.first + experts.count):
            modules = [N.expert_module(layer, e, part, dialect) for part in parts]
            read = [_read_packed(index, m, (out // len(parts), inp), cfg, scale_dtype) for m in modules]
            per_expert.append((torch.cat([p for p, _ in read]), torch.cat([s for _, s in read])))
            consumed.update(f"{m}.{c}" for m in modules for c in COMPANIONS)
        experts.set_packed(proj, torch.stack([p for p, _ in per_expert]), torch.stack([s for _, s in per_expert]))
    return consumed


def _read_packed(
    index: TensorIndex, module: str, expected: tuple[int, int], cfg: ModelConfig, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection's (packed [out, in/8], scale [out, in/g]), checked against the format's rules."""
    scheme = cfg.int4
    assert scheme is not None  # _int4_layout refused packed tensors without a quantization_config
    names = {c: f"{module}.{c}" for c in COMPANIONS}
    for name in names.values():
        if name not in index.file_of:
            raise QuantizedTensorError(name, "missing: packed weights need weight_packed, weight_scale, weight_shape")
    if not scheme.covers(module):
        raise QuantizedTensorError(names["weight_packed"], "is packed, but quantization_config ignores its module")
    packed, scale, shape = (index.get(names[c]) for c in COMPANIONS)
    check_packed(module, packed, scale, shape, expected, scheme.group_size)
    if scale.dtype != scale_dtype:
        raise QuantizedTensorError(names["weight_scale"], f"is {scale.dtype}, other scales are {scale_dtype}")
    return packed, scale


_LAYER = re.compile(r"layers\.(\d+)\.")


def _is_extra_layer(name: str, num_layers: int) -> bool:
    """Multi-token-prediction layers past num_hidden_layers: present in some releases, unused here."""
    m = _LAYER.search(name)
    return m is not None and int(m.group(1)) >= num_layers


def _keep_gate_bias_fp32(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MoEGate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()


def routed_expert_bytes(model: nn.Module) -> int:
    """Bytes this process holds for routed experts (what expert parallelism divides): packed
    weights and scales for INT4 experts. Their dequantization scratch, one expert's float weights
    per process, is not counted."""
    return sum(m.resident_bytes() for m in model.modules() if isinstance(m, ExpertBank))
