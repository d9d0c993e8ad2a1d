from __future__ import annotations

import pytest
import torch

from runtime.checkpoint.maker import init_random, model_config_of
from runtime.models.config import TextConfig
from runtime.models.experts import (
    DequantScratch,
    Int4Layout,
    Int4RoutedExperts,
    RoutedExperts,
    expert_factory,
)
from runtime.models.int4 import pack_int4, quantize_int4


def _float_experts(cfg: TextConfig, seed: int = 7) -> RoutedExperts:
    full = RoutedExperts(cfg)
    init_random(full, torch.Generator().manual_seed(seed))
    return full


def _routing(cfg: TextConfig, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                       for _ in range(tokens)])
    return x, ids, torch.rand(tokens, cfg.num_experts_per_tok, generator=g)


def _quantized(full: RoutedExperts, cfg: TextConfig, group: int, first: int = 0, count: int | None = None,
               scale_dtype: torch.dtype = torch.bfloat16) -> Int4RoutedExperts:
    count = full.count - first if count is None else count
    experts = Int4RoutedExperts(cfg, first, count, Int4Layout(group, scale_dtype), DequantScratch())
    for proj in ("gate_up_proj", "down_proj"):
        q, scale = quantize_int4(getattr(full, proj)[first : first + count].detach(), group, scale_dtype)
        experts.set_packed(proj, pack_int4(q), scale)
    return experts


def _float_twin(experts: Int4RoutedExperts, cfg: TextConfig) -> RoutedExperts:
    twin = RoutedExperts(cfg, experts.first, experts.count)
    with torch.no_grad():
        for proj, w in experts.dequantized().items():
            getattr(twin, proj).copy_(w)
    return twin


def test_experts_split_across_ranks_sum_to_the_whole() -> None:
    cfg = model_config_of("odd", vocab_size=64).text
    full = _float_experts(cfg)
    half = cfg.n_routed_experts // 2
    parts = [RoutedExperts(cfg, 0, half), RoutedExperts(cfg, half, cfg.n_routed_experts - half)]
    with torch.no_grad():
        for p in parts:
            p.gate_up_proj.copy_(full.gate_up_proj[p.first : p.first + p.count])
            p.down_proj.copy_(full.down_proj[p.first : p.first + p.count])
        x, ids, w = _routing(cfg, 10)
        torch.testing.assert_close(parts[0](x, ids, w) + parts[1](x, ids, w), full(x, ids, w))


@pytest.mark.parametrize(("preset", "group"), [("tiny", 32), ("mla576", 32), ("odd", 16)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_int4_experts_equal_float_experts_on_the_dequantized_weights(
    preset: str, group: int, scale_dtype: torch.dtype
) -> None:
    cfg = model_config_of(preset, vocab_size=64).text
    full = _float_experts(cfg)
    first, count = 1, cfg.n_routed_experts - 2  # a rank's slice: some tokens' experts are elsewhere
    experts = _quantized(full, cfg, group, first, count, scale_dtype)
    x, ids, w = _routing(cfg, 17)
    with torch.no_grad():
        assert torch.equal(experts(x, ids, w), _float_twin(experts, cfg)(x, ids, w))  # float32: exact


def test_int4_experts_in_bfloat16_equal_float_experts_on_the_bf16_dequantized_weights() -> None:
    cfg = model_config_of("tiny", vocab_size=64).text
    experts = _quantized(_float_experts(cfg), cfg, 32).to(torch.bfloat16)
    twin = _float_twin(experts, cfg).to(torch.bfloat16)
    x, ids, w = _routing(cfg, 9)
    with torch.no_grad():
        assert torch.equal(experts(x.bfloat16(), ids, w), twin(x.bfloat16(), ids, w))


def test_casting_the_model_leaves_scales_bit_exact_and_small() -> None:
    cfg = model_config_of("tiny", vocab_size=64).text
    experts = _quantized(_float_experts(cfg), cfg, 32, scale_dtype=torch.float16)
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    experts.to(torch.bfloat16).to(torch.float32)
    after = experts.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("preset", ["tiny", "mla576"])
def test_packed_experts_hold_under_three_tenths_of_bf16(preset: str) -> None:
    cfg = model_config_of(preset, vocab_size=64).text
    full = _float_experts(cfg)
    experts = _quantized(full, cfg, 32)
    bf16 = full.to(torch.bfloat16).resident_bytes()
    assert experts.resident_bytes() == bf16 * 9 // 32  # 4 bits + 16 / 32 bits of scale, per 16-bit weight


def test_layers_share_one_scratch_of_one_experts_size() -> None:
    cfg = model_config_of("tiny", vocab_size=64).text
    make = expert_factory(cfg, Int4Layout(32))
    layers = [make(0, cfg.n_routed_experts) for _ in range(3)]
    x, ids, w = _routing(cfg, 5)
    with torch.no_grad():
        for layer in layers:
            layer(x, ids, w)
    scratch = {id(layer.scratch) for layer in layers if isinstance(layer, Int4RoutedExperts)}
    assert len(scratch) == 1
    one_expert = 3 * cfg.moe_intermediate_size * cfg.hidden_size  # gate, up and down weights
    assert layers[0].scratch.nbytes == one_expert * (4 + 1)  # float32 weights + uint8 nibbles
