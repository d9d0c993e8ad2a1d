"""The INT4 format against compressed-tensors' own code: packing bit for bit, quantization, and the
quantization_config it reads and writes."""

from __future__ import annotations

import copy

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from runtime.errors import QuantizedTensorError, UnsupportedQuantizationError
from runtime.models.int4 import check_packed, dequantize_int4, pack_int4, quantize_int4, unpack_int4
from runtime.models.int4_scheme import RELEASE_IGNORE, Int4Scheme, parse_quantization_config

G = torch.Generator().manual_seed(0)


def _random_q(*shape: int) -> torch.Tensor:
    return torch.randint(-8, 8, shape, generator=G, dtype=torch.int8)


@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (96, 48), (3, 5, 32)])
def test_pack_equals_compressed_tensors(shape: tuple[int, ...]) -> None:
    q = _random_q(*shape)
    ours = pack_int4(q)
    assert ours.dtype == torch.int32 and ours.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(ours, pack_to_int32(q, 4))
    assert torch.equal(unpack_int4(ours), q)


@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (96, 48)])
def test_unpack_equals_compressed_tensors_on_any_bits(shape: tuple[int, ...]) -> None:
    words = torch.randint(-(2**31), 2**31 - 1, (shape[0], shape[1] // 8), generator=G, dtype=torch.int32)
    assert torch.equal(unpack_int4(words), unpack_from_int32(words, 4, torch.Size(shape)))


def test_first_value_sits_in_the_lowest_bits_as_q_plus_8() -> None:
    q = torch.tensor([[-8, 7, 0, 1, -1, 2, 3, 1]], dtype=torch.int8)
    expected = sum((v + 8) << (4 * i) for i, v in enumerate(q[0].tolist()))
    assert pack_int4(q).item() == expected - 2**32  # the top nibble (9) sets the sign bit


def test_quantize_equals_compressed_tensors_rule() -> None:
    w = torch.randn(16, 128, generator=G)
    q, scale = quantize_int4(w, 32)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    groups = w.view(16, 4, 32)
    their_scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    assert torch.equal(scale, their_scale.to(torch.bfloat16))
    their_q = quantize(w, scale.float(), zp, args, dtype=torch.int8)
    assert torch.equal(q, their_q)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_dequantize_error_within_half_a_step(scale_dtype: torch.dtype) -> None:
    w = torch.randn(64, 96, generator=G) * 0.05
    q, scale = quantize_int4(w, 32, scale_dtype)
    deq = dequantize_int4(pack_int4(q), scale, 32)
    step = scale.float().repeat_interleave(32, dim=1)
    # Half a step, plus what the clamp at +7 costs when bf16 rounded the scale down (7.5 * 2^-8 of it).
    assert ((deq - w).abs() <= step * (0.5 + 7.5 * 2**-8)).all()
    assert torch.equal(deq, q.float() * step)  # exact: no rounding beyond the quantization itself


def test_dequantize_into_scratch_equals_fresh() -> None:
    q, scale = quantize_int4(torch.randn(2, 24, 64, generator=G), 16)
    packed = pack_int4(q)
    out, nibbles = torch.full((2, 24, 64), float("nan")), torch.empty(2, 24, 64, dtype=torch.uint8)
    assert dequantize_int4(packed, scale, 16, out, nibbles) is out
    assert torch.equal(out, dequantize_int4(packed, scale, 16))


# --- quantization_config -----------------------------------------------------------------------


def test_written_config_is_compressed_tensors_own_model() -> None:
    ours = Int4Scheme(32).to_json()
    theirs = QuantizationConfig.model_validate(ours).model_dump()
    for key, value in ours.items():
        if key != "config_groups":
            assert theirs[key] == value, key
    their_weights = theirs["config_groups"]["group_0"]["weights"]
    assert {k: their_weights[k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    assert parse_quantization_config({"quantization_config": ours}) == Int4Scheme(32)


def test_ignore_list_keeps_attention_shared_and_dense_unquantized() -> None:
    scheme = Int4Scheme(32)
    for module in ("language_model.model.layers.1.mlp.experts.3.gate_proj",
                   "model.language_model.layers.2.mlp.experts.0.down_proj"):
        assert scheme.covers(module), module
    for module in ("lm_head", "language_model.model.layers.1.self_attn.kv_b_proj",
                   "language_model.model.layers.1.mlp.shared_experts.up_proj",
                   "model.language_model.layers.0.mlp.gate_proj"):
        assert not scheme.covers(module), module
    assert scheme.ignore == RELEASE_IGNORE


def test_config_in_text_config_only_and_in_both_places() -> None:
    quant = Int4Scheme(16).to_json()
    assert parse_quantization_config({"text_config": {"quantization_config": quant}}) == Int4Scheme(16)
    assert parse_quantization_config({"quantization_config": quant, "text_config": {"quantization_config": quant}})
    assert parse_quantization_config({"text_config": {}}) is None


def _with(path: str, value) -> dict:
    quant = copy.deepcopy(Int4Scheme(32).to_json())
    *parents, leaf = path.split(".")
    node = quant
    for p in parents:
        node = node[p]
    node[leaf] = value
    return {"quantization_config": quant}


@pytest.mark.parametrize(("path", "value", "named"), [
    ("quant_method", "awq", "quant_method"),
    ("format", "float-quantized", "format"),
    ("quantization_status", "frozen", "quantization_status"),
    ("config_groups.group_0.weights.num_bits", 8, "num_bits"),
    ("config_groups.group_0.weights.symmetric", False, "symmetric"),
    ("config_groups.group_0.weights.strategy", "channel", "strategy"),
    ("config_groups.group_0.weights.type", "float", "type"),
    ("config_groups.group_0.weights.group_size", 20, "group_size"),
    ("config_groups.group_0.weights.actorder", "group", "actorder"),
    ("config_groups.group_0.input_activations", {"num_bits": 8}, "input_activations"),
    ("config_groups.group_0", ["Linear"], "preset"),
    ("kv_cache_scheme", {"num_bits": 8}, "kv_cache_scheme"),
    ("transform_config", {"config_groups": {"u": {}}}, "transform_config"),
    ("ignore", ["re:(unclosed"], "ignore"),
])
def test_unsupported_schemes_are_refused_by_key(path: str, value, named: str) -> None:
    with pytest.raises(UnsupportedQuantizationError, match=named):
        parse_quantization_config(_with(path, value))


def test_two_disagreeing_configs_are_refused() -> None:
    raw = {"quantization_config": Int4Scheme(32).to_json(),
           "text_config": {"quantization_config": Int4Scheme(16).to_json()}}
    with pytest.raises(UnsupportedQuantizationError, match="differ"):
        parse_quantization_config(raw)


# --- packed tensor rules -----------------------------------------------------------------------

M = "m.experts.0.gate_proj"


def _triple(out: int = 16, inp: int = 64, g: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, scale = quantize_int4(torch.randn(out, inp, generator=G), g)
    return pack_int4(q), scale, torch.tensor([out, inp], dtype=torch.int32)


def test_a_consistent_triple_passes_with_int64_shape_and_fp16_scale() -> None:
    packed, scale, shape = _triple()
    check_packed(M, packed, scale.half(), shape.long(), (16, 64), 32)


@pytest.mark.parametrize(("edit", "tensor", "problem"), [
    (lambda p, s, sh: (p[:, :4], s, sh), "weight_packed", "needs torch.int32"),
    (lambda p, s, sh: (p.long(), s, sh), "weight_packed", "int64"),
    (lambda p, s, sh: (p, s[:, :1], sh), "weight_scale", r"\[16, 1\]"),
    (lambda p, s, sh: (p, s.to(torch.int16), sh), "weight_scale", "int16"),
    (lambda p, s, sh: (p, s * float("inf"), sh), "weight_scale", "non-finite"),
    (lambda p, s, sh: (p, s, torch.tensor([16, 72], dtype=torch.int32)), "weight_shape", "the model needs"),
    (lambda p, s, sh: (p, s, sh.float()), "weight_shape", "float32"),
])
def test_broken_triples_name_the_tensor(edit, tensor: str, problem: str) -> None:
    packed, scale, shape = edit(*_triple())
    with pytest.raises(QuantizedTensorError, match=rf"'{M}\.{tensor}'.*{problem}"):
        check_packed(M, packed, scale, shape, (16, 64), 32)


def test_group_size_must_divide_the_input_dim() -> None:
    packed, scale, shape = _triple(16, 48, 16)
    with pytest.raises(QuantizedTensorError, match=r"weight_packed.*48 is not a multiple of group_size 32"):
        check_packed(M, packed, scale, shape, (16, 48), 32)
