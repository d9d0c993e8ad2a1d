"""`plan`: parameter counts equal the modules the runtime builds; the real Kimi-K2.5 config gives the
published sizes; the smallest EP size that fits is the first one whose rank 0 fits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from runtime.checkpoint.maker import config_json, model_config_of
from runtime.checkpoint.presets import PRESETS
from runtime.cli import main
from runtime.lm_service.expert_parallel import expert_range
from runtime.models.config import load_model_config, parse_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM, MoEGate
from runtime.models.moonvit import VisionTower
from runtime.plan import INT4, ExpertFormat, GiB, PlanInputs, expert_format, make_plan, param_counts

# moonshotai/Kimi-K2.5 config.json (original dialect), the keys the plan reads; its release stores
# the routed experts as compressed-tensors int4, group 32.
KIMI_K25 = {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "model_type": "kimi_k25",
    "dtype": "bfloat16",
    "media_placeholder_token_id": 163605,
    "tie_word_embeddings": False,
    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "group_size": 32, "type": "int", "symmetric": True, "strategy": "group"}}},
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    },
    "text_config": {
        "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "num_experts_per_tok": 8,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 2.827,
        "max_position_embeddings": 262144, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_theta": 50000.0,
    },
    "vision_config": {
        "patch_size": 14, "init_pos_emb_height": 64, "init_pos_emb_width": 64, "init_pos_emb_time": 4,
        "vt_hidden_size": 1152, "vt_intermediate_size": 4304, "vt_num_hidden_layers": 27,
        "vt_num_attention_heads": 16, "merge_kernel_size": [2, 2], "mm_hidden_size": 1152,
        "projector_ln_eps": 1e-5, "text_hidden_size": 7168,
    },
}


def _numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_counts_equal_the_constructed_modules(preset: str) -> None:
    cfg = model_config_of(preset, 320)
    counts = param_counts(cfg)
    assert counts.lm_total == _numel(DeepseekV3LM(cfg.text, cfg.tie_word_embeddings))
    assert counts.vision == _numel(VisionTower(cfg.vision, cfg.text.hidden_size))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("ep_size", [1, 3])
def test_rank0_bytes_equal_a_constructed_bf16_rank0(preset: str, ep_size: int) -> None:
    """Rank 0 as the loader builds it: bf16, gate bias kept float32, only its own experts."""
    cfg = model_config_of(preset, 320)
    lm = DeepseekV3LM(cfg.text, cfg.tie_word_embeddings, expert_range(cfg.text.n_routed_experts, ep_size, 0))
    lm = lm.to(torch.bfloat16)
    for m in lm.modules():
        if isinstance(m, MoEGate):
            m.e_score_correction_bias = m.e_score_correction_bias.float()
    plan = make_plan(cfg, PlanInputs(context=10, batch=3, experts=ExpertFormat("bf16", 16), reserve_gib=0))
    rank0 = plan.rank(ep_size)
    assert rank0.rank0_bytes - plan.kv_bytes == _bytes(lm)
    assert plan.kv_bytes == 10 * 3 * cfg.text.num_hidden_layers * cfg.text.latent_dim * 2


def test_real_kimi_k25_config_only_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K25))  # no weights: config.json alone
    cfg = load_model_config(tmp_path)
    counts = param_counts(cfg)
    # Hand-computed from the release's tensor shapes.
    attention = 1536 * 7168 + 1536 + 12288 * 1536 + 576 * 7168 + 512 + 16384 * 512 + 7168 * 8192
    routed = 60 * 384 * 3 * 2048 * 7168
    rest = (2 * 163840 * 7168 + 61 * attention + 3 * 18432 * 7168 + 60 * 3 * 2048 * 7168
            + 60 * 384 * 7168 + 60 * 384 + (2 * 61 + 1) * 7168)
    block = 3456 * 1152 + 3456 + 1152 * 1152 + 1152 + 2 * 4304 * 1152 + 4304 + 1152 + 4 * 1152
    vision = (27 * block + 1152 * 3 * 14 * 14 + 1152 + 64 * 64 * 1152 + 2 * 1152
              + 2 * 1152 + 4608 * 4608 + 4608 + 7168 * 4608 + 7168)
    assert counts.routed_experts == routed == 1_014_686_023_680
    assert counts.lm_total == routed + rest
    assert counts.vision == vision
    assert abs(counts.total / 1.03e12 - 1) < 0.01  # Kimi K2's ~1.03T parameters

    plan = make_plan(cfg, PlanInputs(context=131072, batch=16, experts=expert_format(cfg, "auto")))
    assert plan.inputs.experts.bits_per_weight == 4.5
    total = plan.lm_non_expert_bytes + plan.routed_expert_bytes + plan.vision_bytes
    assert abs(total / GiB / 554.27 - 1) < 0.001  # the release's safetensors hold 554.27 GiB of tensors
    assert plan.kv_bytes_per_token == 61 * 576 * 2
    assert plan.kv_bytes == 61 * 576 * 2 * 131072 * 16


def test_smallest_ep_size_is_the_first_whose_rank0_fits(tmp_path: Path) -> None:
    cfg = parse_model_config(KIMI_K25)
    plan = make_plan(cfg, PlanInputs(context=131072, batch=16, experts=INT4, kv_fp8=True, reserve_gib=8))
    device = 141 * GiB
    fit = plan.min_ep_size(device)
    assert fit is not None and plan.rank(fit).fits(device) and not plan.rank(fit - 1).fits(device)
    fixed = plan.lm_non_expert_bytes + plan.kv_bytes + plan.reserve_bytes
    per_expert = plan.routed_expert_bytes / 384
    assert fit == min(e for e in range(1, 385) if fixed + math.ceil(384 / e) * per_expert <= device)
    assert plan.min_ep_size(80 * GiB) is None  # bf16 weights + fp8 KV of 128k x 16 alone exceed 80 GiB
    worker = plan.rank(fit)
    assert worker.worker_bytes < worker.rank0_bytes


def test_expert_format_from_the_config() -> None:
    spec = PRESETS["tiny"]
    raw = config_json(spec, spec.text_config(320), {k: 1 for k in ("[BOS]", "[EOS]", "[PAD]", "<|media_pad|>",
                      "<|kimi_k25_video_placeholder|>", "<|media_begin|>", "<|media_end|>")}, "transformers",
                      "float32")
    assert expert_format(parse_model_config(raw), "auto").bits_per_weight == 32
    assert expert_format(parse_model_config(raw), "int4").bits_per_weight == 4.5
    assert expert_format(parse_model_config(KIMI_K25), "bf16").bits_per_weight == 16


def test_cli_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K25))
    args = ["plan", "--model", str(tmp_path), "--device-memory-gib", "141", "--kv-fp8"]
    assert main([*args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["min_ep_size"] == 13 and rep["ranks"][-1]["fits"]
    assert main([*args, "--ep-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "smallest EP size that fits 141 GiB: 13" in text and "531.56 GiB" in text
    assert main(["plan", "--model", str(tmp_path), "--ep-size", "385"]) == 2
