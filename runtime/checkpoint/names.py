"""Where each of our parameters lives in a checkpoint, for both weight dialects.

Our parameter names equal transformers' once its prefixes are stripped, so:
- "transformers": `model.vision_tower.*`, `model.mm_projector.*`, `model.language_model.*`,
  `lm_head.weight`; routed experts fused [E, 2I, H] / [E, H, I] (an EP rank reads a row slice).
- "original" (moonshotai release): `vision_tower.encoder.blocks.N.{wqkv,wo,norm0,norm1,mlp.fc0,
  mlp.fc1}`, `mm_projector.proj.{0,2}`, `language_model.model.*`, `language_model.lm_head.weight`,
  per-expert `mlp.experts.E.{gate,up,down}_proj.weight`. `wqkv` rows of q and k are in
  interleaved-rope order; we use split-halves order, so they are permuted on the way in and out.
- INT4 routed experts (either dialect): per expert, `mlp.experts.E.{gate,up,down}_proj.` +
  `weight_packed` / `weight_scale` / `weight_shape`, as the release stores them and as transformers'
  compressed-tensors loading reads them (it merges per-expert tensors into its fused experts after
  dequantizing); the transformers dialect has no fused packed form.

`plan_*` answers "which tensors build this parameter" (loading); `export_*` is the inverse
(writing checkpoints). Both read the same rename tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

WeightDialect = Literal["original", "transformers"]


@dataclass(frozen=True)
class Direct:
    name: str


@dataclass(frozen=True)
class RowSlice:
    """Rows [start, stop) of a fused tensor (an EP rank's experts)."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class QkvPart:
    """One of q/k/v out of the original fused `wqkv`; q and k permuted from interleaved rope order."""

    name: str
    index: int
    rope_heads: int | None


@dataclass(frozen=True)
class ExpertStack:
    """Per-expert tensors stacked on a new dim 0; each expert's parts concatenated on dim 0."""

    names: tuple[tuple[str, ...], ...]


Source = Direct | RowSlice | QkvPart | ExpertStack

_VISION_ORIGINAL = [
    (r"^vision_tower\.patch_embed\.pos_emb\.position_embeddings$", "vision_tower.patch_embed.pos_emb.weight"),
    (r"^vision_tower\.layers\.(\d+)\.norm1\.", r"vision_tower.encoder.blocks.\1.norm0."),
    (r"^vision_tower\.layers\.(\d+)\.norm2\.", r"vision_tower.encoder.blocks.\1.norm1."),
    (r"^vision_tower\.layers\.(\d+)\.attn\.proj\.", r"vision_tower.encoder.blocks.\1.wo."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc1\.", r"vision_tower.encoder.blocks.\1.mlp.fc0."),
    (r"^vision_tower\.layers\.(\d+)\.mlp\.fc2\.", r"vision_tower.encoder.blocks.\1.mlp.fc1."),
    (r"^vision_tower\.final_layernorm\.", "vision_tower.encoder.final_layernorm."),
    (r"^mm_projector\.in_proj\.", "mm_projector.proj.0."),
    (r"^mm_projector\.out_proj\.", "mm_projector.proj.2."),
]
_QKV = re.compile(r"^vision_tower\.layers\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)$")
_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


# --- vision ------------------------------------------------------------------------------------


def vision_name(name: str, dialect: WeightDialect) -> str:
    return _rename(name, _VISION_ORIGINAL) if dialect == "original" else "model." + name


def plan_vision(names: list[str], dialect: WeightDialect, num_heads: int) -> dict[str, Source]:
    plan: dict[str, Source] = {}
    for name in names:
        m = _QKV.match(name)
        if dialect == "original" and m:
            layer, which, kind = m.groups()
            index = "qkv".index(which)
            plan[name] = QkvPart(
                f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}", index, None if which == "v" else num_heads
            )
        else:
            plan[name] = Direct(vision_name(name, dialect))
    return plan


def export_vision(state: dict[str, torch.Tensor], dialect: WeightDialect, num_heads: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _QKV.match(name)
        if dialect == "original" and m:
            layer, which, kind = m.groups()
            if which != "q":
                continue  # written together with q
            parts = [state[f"vision_tower.layers.{layer}.attn.{x}_proj.{kind}"] for x in "qkv"]
            parts[0], parts[1] = (halves_to_interleaved(p, num_heads) for p in parts[:2])
            out[f"vision_tower.encoder.blocks.{layer}.wqkv.{kind}"] = torch.cat(parts)
        else:
            out[vision_name(name, dialect)] = t
    return out


def interleaved_to_halves(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head: (x0, y0, x1, y1, ...) -> (x0, x1, ..., y0, y1, ...)."""
    rows = t.shape[0]
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def halves_to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


# --- language model ----------------------------------------------------------------------------


def lm_name(name: str, dialect: WeightDialect) -> str:
    if dialect == "original":
        return "language_model.lm_head.weight" if name == "lm_head.weight" else "language_model.model." + name
    return name if name == "lm_head.weight" else "model.language_model." + name


def expert_module(layer: int, expert: int, proj: str, dialect: WeightDialect) -> str:
    """One routed expert's projection (gate_proj, up_proj, down_proj) as a checkpoint module name.
    Its float tensor adds `.weight`; INT4 checkpoints of either dialect store it per expert as
    `.weight_packed`, `.weight_scale`, `.weight_shape` (what transformers' loader merges into its
    fused experts after compressed-tensors dequantizes them)."""
    return lm_name(f"layers.{layer}.mlp.experts.{expert}.{proj}", dialect)


def expert_names(layer: int, expert: int, proj: str, dialect: WeightDialect) -> str:
    return expert_module(layer, expert, proj, dialect) + ".weight"


def plan_lm(names: list[str], dialect: WeightDialect, expert_range: tuple[int, int]) -> dict[str, Source]:
    first, count = expert_range
    plan: dict[str, Source] = {}
    for name in names:
        m = _EXPERTS.match(name)
        if not m:
            plan[name] = Direct(lm_name(name, dialect))
        elif dialect == "transformers":
            plan[name] = RowSlice(lm_name(name, dialect), first, first + count)
        else:
            layer, fused = int(m.group(1)), m.group(2)
            projs = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
            plan[name] = ExpertStack(
                tuple(tuple(expert_names(layer, e, p, dialect) for p in projs) for e in range(first, first + count))
            )
    return plan


def all_expert_tensor_names(
    layer: int, n_experts: int, dialect: WeightDialect, packed: tuple[str, ...] = ()
) -> list[str]:
    """Every routed-expert tensor of a layer: what other EP ranks load and this one skips.
    packed: the INT4 tensor suffixes (weight_packed, ...) when the experts are stored packed."""
    projs = ("gate_proj", "up_proj", "down_proj")
    if packed:
        return [f"{expert_module(layer, e, p, dialect)}.{c}" for e in range(n_experts) for p in projs for c in packed]
    if dialect == "transformers":
        return [lm_name(f"layers.{layer}.mlp.experts.{p}", dialect) for p in ("gate_up_proj", "down_proj")]
    return [expert_names(layer, e, p, dialect) for e in range(n_experts) for p in projs]


ExpertWriter = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def export_lm(
    state: dict[str, torch.Tensor], dialect: WeightDialect, write_expert: ExpertWriter | None = None
) -> dict[str, torch.Tensor]:
    """write_expert(module, weight [out, in]) -> that module's tensors: stores routed experts per
    expert through it, in either dialect (INT4 writes them packed). Without it, the original
    dialect stores `.weight` per expert and the transformers dialect keeps the fused tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = _EXPERTS.match(name)
        if not m or (dialect == "transformers" and write_expert is None):
            out[lm_name(name, dialect)] = t
            continue
        for module, w in _per_expert(int(m.group(1)), m.group(2), t, dialect):
            out.update(write_expert(module, w) if write_expert else {module + ".weight": w.contiguous()})
    return out


def _per_expert(layer: int, fused: str, t: torch.Tensor, dialect: WeightDialect) -> list[tuple[str, torch.Tensor]]:
    """A fused expert parameter [E, 2I, H] or [E, H, I] as (module, weight) per expert and projection."""
    pieces = []
    for e in range(t.shape[0]):
        if fused == "gate_up_proj":
            gate, up = t[e].chunk(2, dim=0)
            pieces += [(expert_module(layer, e, "gate_proj", dialect), gate),
                       (expert_module(layer, e, "up_proj", dialect), up)]
        else:
            pieces.append((expert_module(layer, e, "down_proj", dialect), t[e]))
    return pieces


def detect_weight_dialect(names: list[str]) -> WeightDialect | None:
    if any(n.startswith("model.language_model.") for n in names):
        return "transformers"
    if any(n.startswith("language_model.") for n in names):
        return "original"
    return None
