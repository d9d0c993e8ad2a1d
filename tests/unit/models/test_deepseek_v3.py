from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.checkpoint.maker import init_random, model_config_of
from runtime.checkpoint.presets import PRESETS
from runtime.models.config import RopeConfig
from runtime.models.deepseek_v3 import DeepseekV3LM, MoEGate, rope_inv_freq, softmax_scale
from tests.latent_kv import ContiguousLatentKV, SequenceBatch


def _lm(preset: str, seed: int = 0) -> DeepseekV3LM:
    cfg = model_config_of(preset, vocab_size=64)
    lm = DeepseekV3LM(cfg.text, cfg.tie_word_embeddings)
    init_random(lm, torch.Generator().manual_seed(seed))
    return lm.eval()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_absorbed_attention_equals_naive(preset: str) -> None:
    lm = _lm(preset)
    attn = lm.layers[0].self_attn
    cfg = lm.cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, cfg.hidden_size, generator=g)
    positions = torch.arange(7)
    cos, sin = lm.rotary(positions, x.dtype)
    q_nope, q_rot, latent = attn.project(x, lm.rotary, cos, sin)
    with torch.no_grad():
        naive = attn.attend_naive(q_nope, q_rot, latent)
        absorbed = attn.attend_absorbed(q_nope, q_rot, latent)
    assert naive.shape == (7, cfg.num_attention_heads, cfg.v_head_dim)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_incremental_decode_equals_full_prefill(preset: str) -> None:
    lm = _lm(preset)
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lm.logits(lm(lm.embed(ids), SequenceBatch([12], [ContiguousLatentKV(lm.cfg, 12, torch.float32)])))
        kv = ContiguousLatentKV(lm.cfg, 12, torch.float32)
        steps = [lm.logits(lm(lm.embed(ids[:5]), SequenceBatch([5], [kv])))]
        for t in ids[5:]:
            steps.append(lm.logits(lm(lm.embed(t[None]), SequenceBatch([1], [kv]))))
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-4, atol=1e-4)
    assert kv.length == 12


def test_two_sequences_in_one_batch_equal_each_alone() -> None:
    lm = _lm("tiny")
    a, b = torch.randint(0, 64, (6,)), torch.randint(0, 64, (9,))
    with torch.no_grad():
        alone = [lm.logits(lm(lm.embed(s), SequenceBatch([len(s)], [ContiguousLatentKV(lm.cfg, 16, torch.float32)])))
                 for s in (a, b)]
        kvs = [ContiguousLatentKV(lm.cfg, 16, torch.float32) for _ in range(2)]
        together = lm.logits(lm(lm.embed(torch.cat([a, b])), SequenceBatch([6, 9], kvs)))
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-5, atol=1e-5)


def _brute_force_route(gate: MoEGate, x: torch.Tensor) -> list[dict[int, float]]:
    """Per token, in plain Python: pick groups by the sum of their two best biased scores, then
    the best biased experts inside them; weight by the unbiased scores."""
    cfg = gate.cfg
    per_group = cfg.n_routed_experts // cfg.n_group
    routes = []
    for row in x:
        scores = [float(torch.sigmoid(torch.dot(row, w))) for w in gate.weight.detach()]
        biased = [s + float(b) for s, b in zip(scores, gate.e_score_correction_bias, strict=True)]
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(cfg.n_group)]
        groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
        total = sum(scores[e] for e in chosen) if cfg.norm_topk_prob else 1.0
        routes.append({e: scores[e] / total * cfg.routed_scaling_factor for e in chosen})
    return routes


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gate_equals_brute_force(preset: str) -> None:
    lm = _lm(preset, seed=3)
    gate = next(m for m in lm.modules() if isinstance(m, MoEGate))
    x = torch.randn(16, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        weights, ids = gate(x)
    for row, expected in enumerate(_brute_force_route(gate, x)):
        got = {int(e): float(w) for e, w in zip(ids[row], weights[row], strict=True)}
        assert got.keys() == expected.keys()
        for e in got:
            assert got[e] == pytest.approx(expected[e], rel=1e-5)


def test_gate_bias_changes_selection_but_not_weights_formula() -> None:
    lm = _lm("tiny", seed=5)
    gate = next(m for m in lm.modules() if isinstance(m, MoEGate))
    x = torch.randn(32, lm.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, before = gate(x)
        gate.e_score_correction_bias[0] = 100.0  # expert 0 now always wins selection
        _, after = gate(x)
    assert not torch.equal(before, after)
    assert bool((after == 0).any(dim=1).all())


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(theta=50000.0, kind="yarn", factor=64.0, original_max_position_embeddings=4096,
                   mscale=1.0, mscale_all_dim=1.0),
        RopeConfig(theta=10000.0, kind="yarn", factor=8.0, original_max_position_embeddings=512),
        RopeConfig(theta=10000.0, kind="yarn", factor=4.0, original_max_position_embeddings=256,
                   mscale=0.707, mscale_all_dim=1.0, beta_fast=16, beta_slow=2),
        RopeConfig(theta=10000.0),
    ],
)
def test_rope_and_softmax_scale_match_transformers(rope: RopeConfig) -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    text = dataclasses.replace(model_config_of("tiny", 64).text, rope=rope, max_position_embeddings=16384)
    params = {"rope_type": rope.kind, "rope_theta": rope.theta}
    if rope.kind == "yarn":
        params |= {"factor": rope.factor, "original_max_position_embeddings": rope.original_max_position_embeddings,
                   "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow}
        params |= {k: v for k, v in (("mscale", rope.mscale), ("mscale_all_dim", rope.mscale_all_dim)) if v}
    ref_cfg = DeepseekV3Config(
        hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads, q_lora_rank=text.q_lora_rank,
        kv_lora_rank=text.kv_lora_rank, qk_rope_head_dim=text.qk_rope_head_dim,
        qk_nope_head_dim=text.qk_nope_head_dim, v_head_dim=text.v_head_dim,
        max_position_embeddings=16384, rope_parameters=params,
    )
    ref_rope = DeepseekV3RotaryEmbedding(ref_cfg)
    inv_freq, scaling = rope_inv_freq(rope, text.qk_rope_head_dim)
    torch.testing.assert_close(inv_freq, ref_rope.inv_freq, rtol=0, atol=0)
    assert scaling == pytest.approx(ref_rope.attention_scaling, rel=1e-12)
    assert softmax_scale(text) == pytest.approx(DeepseekV3Attention(ref_cfg, 0).scaling, rel=1e-12)


def test_latent_cache_holds_exactly_the_latent() -> None:
    cfg = model_config_of("mla576", 64).text
    kv = ContiguousLatentKV(cfg, 10, torch.float32)
    assert kv.buffer.shape == (cfg.num_hidden_layers, 10, 576)
    with pytest.raises(ValueError, match="exceeds the cache"):
        kv.write(0, torch.zeros(11, 576))
