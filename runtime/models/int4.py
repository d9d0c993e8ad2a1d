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

import sys

import torch

from runtime.errors import QuantizedTensorError

# The declaration (quantization_config) has its own torch-free module: the router reads config.json too.
from runtime.models.int4_scheme import PER_WORD

Q_MIN, Q_MAX = -8, 7
SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPE_DTYPES = (torch.int32, torch.int64)
COMPANIONS = ("weight_packed", "weight_scale", "weight_shape")  # what replaces a module's `weight`



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
