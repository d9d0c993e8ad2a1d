"""INT4 weights as compressed-tensors' `pack-quantized` format stores them (the Kimi-K2.5 release's
routed experts): the numbers (pack, unpack, quantize, dequantize), the `quantization_config` that
declares them, and the rules a packed tensor set must obey. The model, the loader and the
checkpoint maker all use this one module, so a rule of the format has one owner.

A Linear weight W [out, in] is stored as three tensors beside each other:
- `weight_packed` int32 [out, in/8]: q + 8 for q in [-8, 7], eight per word along the input dim,
  the first in the lowest 4 bits;
- `weight_scale` bf16 (some writers fp16) [out, in/g]: one scale per g input columns;
- `weight_shape` int32 (some writers int64) [2]: the unpacked [out, in].
W[o, i] = q[o, i] * scale[o, i // g]: symmetric, no zero point.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

import torch

from runtime.errors import QuantizedTensorError, UnsupportedQuantizationError

PER_WORD = 8  # 4-bit values in one int32
Q_MIN, Q_MAX = -8, 7
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPE_DTYPES = (torch.int32, torch.int64)
COMPANIONS = ("weight_packed", "weight_scale", "weight_shape")  # what replaces a module's `weight`

# The release's ignore list: attention, shared experts and dense MLPs stay unquantized (`re:` entries
# are regexes matched at the start of a module name); routed experts `mlp.experts.E.*_proj` are not.
RELEASE_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")


# --- the numbers -------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., out, in] with values in [-8, 7] -> int32 [..., out, in/8]."""
    if q.shape[-1] % PER_WORD:
        raise ValueError(f"input dim {q.shape[-1]} is not a multiple of {PER_WORD}")
    u = (q.to(torch.int32) - Q_MIN).view(*q.shape[:-1], q.shape[-1] // PER_WORD, PER_WORD)
    packed = torch.zeros(u.shape[:-1], dtype=torch.int32, device=q.device)
    for i in range(PER_WORD):
        packed |= u[..., i] << (4 * i)  # the top nibble lands on the sign bit: fine, bits are bits
    return packed


def _nibbles(packed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [..., out, in/8] -> uint8 [..., out, in], the stored q + 8 in 0..15.

    Splits bytes rather than shifting words: a byte holds two whole values (low nibble first), and
    int32 `>>` is arithmetic, which would smear the sign bit into the top value."""
    raw = packed.contiguous().view(torch.uint8)  # [..., out, in/2]
    if sys.byteorder == "big" and packed.device.type == "cpu":
        raw = raw.view(*raw.shape[:-1], -1, 4).flip(-1).reshape(raw.shape)
    shape = (*raw.shape[:-1], raw.shape[-1] * 2)
    pairs = (torch.empty(shape, dtype=torch.uint8, device=packed.device) if out is None else out).view(
        *raw.shape, 2
    )
    torch.bitwise_and(raw, 0xF, out=pairs[..., 0])
    torch.bitwise_right_shift(raw, 4, out=pairs[..., 1])
    return pairs.view(shape)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., out, in/8] -> int8 [..., out, in] with values in [-8, 7]."""
    return (_nibbles(packed).to(torch.int8)) + Q_MIN


def quantize_int4(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scale [..., out, in/g]), compressed-tensors' rule:
    scale = max|w| / 7.5 over the group (so max|w| maps to the middle of [-8, 7]), rounded to
    scale_dtype; q = round(w / scale) clamped to [-8, 7]. |w - q * scale| <= scale / 2 (a hair more
    where bf16 rounded the scale down and the clamp bites)."""
    groups = w.float().view(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    scale = (groups.abs().amax(dim=-1) / ((Q_MAX - Q_MIN) / 2)).to(scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)  # an all-zero group
    q = torch.round(groups / scale.float()[..., None]).clamp(Q_MIN, Q_MAX)
    return q.to(torch.int8).view(w.shape), scale


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    nibbles: torch.Tensor | None = None,
) -> torch.Tensor:
    """int32 [..., out, in/8] and scale [..., out, in/g] -> float32 [..., out, in], exactly q * scale
    (a 4-bit integer times a bf16 or fp16 scale fits float32's mantissa). `out` (float32) and
    `nibbles` (uint8), both [..., out, in], are optional scratch buffers reused across calls."""
    shape = (*packed.shape[:-1], packed.shape[-1] * PER_WORD)
    w = torch.empty(shape, dtype=torch.float32, device=packed.device) if out is None else out
    w.copy_(_nibbles(packed, nibbles))
    groups = w.view(*shape[:-1], shape[-1] // group_size, group_size)
    groups.sub_(-Q_MIN).mul_(scale.float()[..., None])
    return w


# --- the config that declares them -------------------------------------------------------------


@dataclass(frozen=True)
class Int4Scheme:
    """config.json's quantization_config, once checked: symmetric INT4 weights with one scale per
    `group_size` input columns, for the Linear modules `targets` names minus `ignore`."""

    group_size: int
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = RELEASE_IGNORE

    def covers(self, module: str) -> bool:
        """Would compressed-tensors quantize this Linear module (named as in the checkpoint)?"""
        targeted = any(t == "Linear" or _match(module, t) for t in self.targets)
        return targeted and not any(_match(module, i) for i in self.ignore)

    def to_json(self) -> dict[str, Any]:
        """quantization_config as the Kimi-K2.5 release writes it (compressed-tensors' own keys)."""
        weights = {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": self.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
        }
        group = {"targets": list(self.targets), "weights": weights, "input_activations": None,
                 "output_activations": None}
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": list(self.ignore), "kv_cache_scheme": None,
        }


def _match(module: str, entry: str) -> bool:
    """compressed-tensors' name rule: `re:` entries are re.match (anchored at the start), others exact."""
    return re.match(entry[3:], module) is not None if entry.startswith("re:") else entry == module


def parse_quantization_config(raw: dict[str, Any]) -> Int4Scheme | None:
    """The scheme config.json declares (at the top level, inside text_config, or both), or None.
    Anything but compressed-tensors' packed symmetric group-wise INT4 weights is refused, naming
    the key, because loading it as that would compute with garbage weights."""
    top = raw.get("quantization_config")
    inner = (raw.get("text_config") or {}).get("quantization_config")
    if top and inner and top != inner:
        raise UnsupportedQuantizationError("quantization_config and text_config.quantization_config differ")
    quant = top or inner
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise UnsupportedQuantizationError(f"quantization_config is {type(quant).__name__}, not an object")
    _require_values(quant, "quantization_config", {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    })
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        if quant.get(key):
            raise UnsupportedQuantizationError(f"quantization_config.{key} is set; this runtime reads weights only")
    name, group = _only_group(quant.get("config_groups"))
    where = f"quantization_config.config_groups.{name}"
    return Int4Scheme(
        group_size=_weights_group_size(group.get("weights"), f"{where}.weights"),
        targets=_strings(group.get("targets"), f"{where}.targets"),
        ignore=_strings(quant.get("ignore") or [], "quantization_config.ignore"),
    )


def _require_values(d: dict[str, Any], where: str, expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if d.get(key) != want:
            raise UnsupportedQuantizationError(f"{where}.{key} is {d.get(key)!r}; this runtime reads only {want!r}")


def _only_group(groups: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(groups, dict) or len(groups) != 1:
        count = len(groups) if isinstance(groups, dict) else "no"
        raise UnsupportedQuantizationError(f"quantization_config.config_groups has {count} groups; expected one")
    name, group = next(iter(groups.items()))
    if not isinstance(group, dict):
        raise UnsupportedQuantizationError(
            f"quantization_config.config_groups.{name} names a preset scheme; spell out its weights"
        )
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise UnsupportedQuantizationError(
                f"quantization_config.config_groups.{name}.{key} is set; only weights may be quantized"
            )
    if group.get("format") not in (None, "pack-quantized"):
        raise UnsupportedQuantizationError(
            f"quantization_config.config_groups.{name}.format is {group['format']!r}; expected 'pack-quantized'"
        )
    return name, group


def _weights_group_size(weights: Any, where: str) -> int:
    if not isinstance(weights, dict):
        raise UnsupportedQuantizationError(f"{where} is missing")
    _require_values(weights, where, {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"})
    for key in ("dynamic", "actorder", "block_structure"):
        if weights.get(key):
            raise UnsupportedQuantizationError(f"{where}.{key} is {weights[key]!r}; this runtime reads only null")
    size = weights.get("group_size")
    if not isinstance(size, int) or size <= 0 or size % PER_WORD:
        raise UnsupportedQuantizationError(f"{where}.group_size is {size!r}; expected a positive multiple of 8")
    return size


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnsupportedQuantizationError(f"{where} must be a list of strings, got {value!r}")
    for entry in value:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise UnsupportedQuantizationError(f"{where} entry {entry!r} is not a valid regex: {e}") from e
    return tuple(value)


# --- the rules a packed tensor set obeys -------------------------------------------------------


def check_packed(
    module: str, packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor, expected: tuple[int, int],
    group_size: int,
) -> None:
    """Raise QuantizedTensorError naming the first tensor of `module` that breaks the format, given
    the [out, in] the model config expects. Nothing that fails here is ever dequantized."""
    name = {c: f"{module}.{c}" for c in COMPANIONS}
    if shape.dtype not in SHAPE_DTYPES or tuple(shape.shape) != (2,):
        raise QuantizedTensorError(name["weight_shape"], f"is {shape.dtype} {list(shape.shape)}, expected int32 [2]")
    out, inp = (int(v) for v in shape.tolist())
    if (out, inp) != expected:
        raise QuantizedTensorError(name["weight_shape"], f"says [{out}, {inp}], the model needs {list(expected)}")
    if inp % group_size:
        raise QuantizedTensorError(
            name["weight_packed"], f"input dim {inp} is not a multiple of group_size {group_size}"
        )
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out, inp // PER_WORD):
        raise QuantizedTensorError(
            name["weight_packed"], f"is {packed.dtype} {list(packed.shape)}; weight_shape [{out}, {inp}] "
            f"needs torch.int32 {[out, inp // PER_WORD]}"
        )
    if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != (out, inp // group_size):
        raise QuantizedTensorError(
            name["weight_scale"], f"is {scale.dtype} {list(scale.shape)}, expected bf16/fp16 {[out, inp // group_size]}"
        )
    if not bool(torch.isfinite(scale).all()):
        raise QuantizedTensorError(name["weight_scale"], "holds non-finite scales")
