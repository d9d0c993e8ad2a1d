"""Routed experts: how tokens reach the experts a rank owns (written once, in ExpertBank), and where
an expert's weights come from: float parameters (RoutedExperts), or INT4 weights kept packed and
dequantized right before their matmuls (Int4RoutedExperts).

Shapes: T tokens, k experts per token, I = moe_intermediate_size; gate_up [2I, hidden] (gate rows
then up rows), down [hidden, I].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.common import activation
from runtime.models.config import TextConfig
from runtime.models.int4 import PER_WORD, dequantize_int4


class ExpertBank(nn.Module):
    """The routed experts this rank owns: global ids [first, first + count). A subclass holds the
    weights and hands out local expert e's (gate_up, down) through `expert_weights`."""

    def __init__(self, cfg: TextConfig, first: int = 0, count: int | None = None):
        super().__init__()
        self.first = first
        self.count = cfg.n_routed_experts - first if count is None else count
        self.num_experts = cfg.n_routed_experts  # of the whole model, this rank's and the others'
        self.act = activation(cfg.hidden_act)

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """Bytes of weights held for these experts (what expert parallelism divides)."""
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.parameters(), self.buffers()))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum of this rank's experts' outputs, each times its routing weight. [T, hidden].

        The (token, choice) pairs routed here are sorted by expert once, so each active expert
        runs two matmuls over one contiguous slice, and one index_add_ sums them back per token
        (in ascending expert order, as a loop over experts would)."""
        out = torch.zeros_like(x)
        local = (ids - self.first).reshape(-1) if self.first else ids.reshape(-1)  # [T * k]
        order = self._pairs_by_expert(local)
        if order.numel() == 0:
            return out
        counts = torch.bincount(local[order], minlength=self.count).tolist()
        tokens = order // ids.shape[1]
        parts = []
        for e, xs in enumerate(x[tokens].split(counts)):  # [pairs, hidden], one slice per expert
            if xs.shape[0]:
                gate_up, down = self.expert_weights(e, x.dtype)
                gate, up = F.linear(xs, gate_up).chunk(2, dim=-1)
                parts.append(F.linear(self.act(gate) * up, down))
        ys = torch.cat(parts) * weights.reshape(-1)[order, None]
        return out.index_add_(0, tokens, ys.to(out.dtype))

    def _pairs_by_expert(self, local: torch.Tensor) -> torch.Tensor:
        """Positions in local [T * k] (local expert ids) of the pairs routed to this rank's experts,
        sorted by expert (stable). A rank that owns every expert skips the ownership filter."""
        if self.first == 0 and self.count == self.num_experts:
            return torch.argsort(local, stable=True)
        mine = torch.nonzero((local >= 0) & (local < self.count)).squeeze(1)
        return mine[torch.argsort(local[mine], stable=True)]


class RoutedExperts(ExpertBank):
    """Float weights, fused like transformers: gate_up_proj [count, 2I, hidden], down_proj [count, hidden, I]."""

    def __init__(self, cfg: TextConfig, first: int = 0, count: int | None = None):
        super().__init__(cfg, first, count)
        inter = cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.count, 2 * inter, cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.count, cfg.hidden_size, inter))

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up_proj[e], self.down_proj[e]


class DequantScratch:
    """Where INT4 experts are dequantized just before their matmuls. One per model (or per
    expert-parallel rank), shared by all its MoE layers: experts run one after another, so one
    expert's float weights are all that is ever live. Reused rather than allocated per expert,
    because at real sizes ([4096, 7168] float32 is 117 MB) fresh pages cost more than the
    dequantization itself. Serves one forward at a time, as a model runs."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        t = self._buffers.get((key, dtype))
        if t is None or tuple(t.shape) != shape or t.device != device:
            t = self._buffers[(key, dtype)] = torch.empty(shape, dtype=dtype, device=device)
        return t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


@dataclass(frozen=True)
class Int4Layout:
    """How a checkpoint's INT4 experts are stored: one scale per group_size inputs, in scale_dtype."""

    group_size: int
    scale_dtype: torch.dtype = torch.bfloat16


class Int4RoutedExperts(ExpertBank):
    """INT4 weights kept packed: per projection, `<proj>_packed` int32 [count, out, in/8] and
    `<proj>_scale` [count, out, in/g] in the checkpoint's scale dtype (with g = 32 and bf16 scales,
    4.5 bits per weight: 0.28x of bf16). Each active expert is dequantized into the shared scratch
    right before its matmuls, to exactly q * scale, so in float32 its output equals float experts
    holding the dequantized weights."""

    def __init__(self, cfg: TextConfig, first: int, count: int, layout: Int4Layout, scratch: DequantScratch):
        super().__init__(cfg, first, count)
        self.group_size, self.scratch = layout.group_size, scratch
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
        for proj, (out, inp) in self.shapes.items():
            # Placeholders of the right shape, as RoutedExperts' empty parameters; the loader replaces them.
            self.register_buffer(f"{proj}_packed", torch.empty(self.count, out, inp // PER_WORD, dtype=torch.int32))
            self.register_buffer(f"{proj}_scale", torch.empty(self.count, out, inp // self.group_size,
                                                              dtype=layout.scale_dtype))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Int4RoutedExperts:
        """Module.to(dtype) casts every floating buffer; the scales keep their stored dtype (2 bytes
        per group, bit-exact, even fp16 ones under .to(bfloat16)) and only follow the packed
        weights to their device."""
        scales = {name: t for name, t in self._buffers.items() if name.endswith("_scale") and t is not None}
        super()._apply(fn, recurse)
        for name, t in scales.items():
            packed = self._buffers[name.replace("_scale", "_packed")]
            assert packed is not None
            self._buffers[name] = t.to(packed.device)
        return self

    def expert_weights(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dequantized("gate_up_proj", e, dtype), self._dequantized("down_proj", e, dtype)

    def _dequantized(self, proj: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        packed, scale = self.packed(proj)
        shape, device = self.shapes[proj], packed.device
        w = dequantize_int4(packed[e], scale[e], self.group_size, self.scratch.get(proj, shape, torch.float32, device),
                            self.scratch.get(proj, shape, torch.uint8, device))
        return w if dtype == torch.float32 else self.scratch.get(proj, shape, dtype, device).copy_(w)

    def packed(self, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed int32 [count, out, in/8], scale [count, out, in/g]) of gate_up_proj or down_proj."""
        return getattr(self, f"{proj}_packed"), getattr(self, f"{proj}_scale")

    def set_packed(self, proj: str, packed: torch.Tensor, scale: torch.Tensor) -> None:
        """Adopt loaded tensors as they are (no copy into a float-cast buffer, no dtype change)."""
        for kind, t in (("packed", packed), ("scale", scale)):
            held = getattr(self, f"{proj}_{kind}")
            if tuple(t.shape) != tuple(held.shape):
                raise ValueError(f"{proj}_{kind} must be {list(held.shape)}, got {list(t.shape)}")
            self._buffers[f"{proj}_{kind}"] = t.to(held.device)

    def dequantized(self) -> dict[str, torch.Tensor]:
        """Every expert's float32 weights, named as RoutedExperts names them (for tests and twins)."""
        return {proj: dequantize_int4(*self.packed(proj), self.group_size) for proj in self.shapes}


ExpertFactory = Callable[[int, int], ExpertBank]


def expert_factory(cfg: TextConfig, int4: Int4Layout | None = None) -> ExpertFactory:
    """How a model (or an expert-parallel rank) builds each MoE layer's experts (first, count):
    float, or INT4 sharing one dequantization scratch."""
    if int4 is None:
        return lambda first, count: RoutedExperts(cfg, first, count)
    scratch = DequantScratch()
    return lambda first, count: Int4RoutedExperts(cfg, first, count, int4, scratch)
