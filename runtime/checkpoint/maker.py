"""`make-checkpoint`: a complete Hugging Face style Kimi-K2.5 checkpoint with random weights.

Weights are initialised so that the model is useful as a test oracle: logits have a wide spread
(greedy picks are not near-ties), and every norm weight and bias differs from its default (a weight
the loader drops changes the output).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from runtime.checkpoint import names as N
from runtime.checkpoint.presets import PRESETS, Preset
from runtime.checkpoint.tokenizer import TOKENIZER_FORMATS, build_tokenizer, write_tiktoken_tokenizer, write_tokenizer
from runtime.images import ProcessorConfig
from runtime.models.config import ModelConfig, RopeConfig, TextConfig, VisionConfig
from runtime.models.deepseek_v3 import DeepseekV3LM
from runtime.models.int4 import pack_int4, quantize_int4
from runtime.models.int4_scheme import Int4Scheme
from runtime.models.moonvit import VisionTower

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_checkpoint(
    out: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dialect: N.WeightDialect = "transformers",
    dtype: str = "float32",
    config_dialect: N.WeightDialect | None = None,
    shards: int = 1,
    tokenizer: str = "tokenizers",
    quantize: str | None = None,
) -> Path:
    """`tokenizer`: "tokenizers" (tokenizer.json) or "tiktoken" (the release's tiktoken.model and
    tokenization_kimi.py, which load only with trust_remote_code); the same vocabulary and weights either way.
    quantize="int4": routed experts stored as the Kimi-K2.5 release stores them (compressed-tensors
    pack-quantized, bf16 scales, quantization_config in config.json and text_config); everything else
    in `dtype` (the release has bfloat16)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if tokenizer not in TOKENIZER_FORMATS:
        raise ValueError(f"unknown tokenizer format {tokenizer!r}; choose from {list(TOKENIZER_FORMATS)}")
    if quantize not in (None, "int4"):
        raise ValueError(f"unknown quantization {quantize!r}; choose 'int4' or none")
    spec = PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = math.ceil(tok.get_vocab_size() / 64) * 64  # spare rows, as real vocabularies have
    text = spec.text_config(vocab)
    if tokenizer == "tiktoken":
        ids = write_tiktoken_tokenizer(out, tok, text.max_position_embeddings, vocab)
    else:
        ids = write_tokenizer(out, tok, text.max_position_embeddings)

    generator = torch.Generator().manual_seed(seed)
    vision = VisionTower(spec.vision, text.hidden_size)
    lm = DeepseekV3LM(text, spec.tie_word_embeddings)
    init_random(vision, generator)
    init_random(lm, generator)

    scheme = Int4Scheme(int4_group_size(text)) if quantize else None
    tensors = N.export_vision(vision.state_dict(), dialect, spec.vision.num_attention_heads)
    tensors.update(N.export_lm(lm.state_dict(), dialect, _int4_writer(scheme.group_size) if scheme else None))
    tensors = {k: v.to(DTYPES[dtype]) if _follows_dtype(k, v) else v for k, v in tensors.items()}
    _save_safetensors(out, tensors, shards)

    cdialect = config_dialect or dialect
    config = config_json(spec, text, ids, cdialect, dtype)
    if scheme:
        config["quantization_config"] = config["text_config"]["quantization_config"] = scheme.to_json()
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = [ids["<|im_end|>"], ids["[EOS]"]]
    generation = {"bos_token_id": ids["[BOS]"], "eos_token_id": eos, "pad_token_id": ids["[PAD]"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(processor_json(spec.processor, cdialect), indent=2) + "\n")
    return out


# --- weights -----------------------------------------------------------------------------------


def init_random(module: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            t.copy_(_random_value(name, tuple(t.shape), g).to(t.dtype))


def _random_value(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return 1.0 + randn(0.1)
    if leaf == "bias" or leaf == "e_score_correction_bias":
        return randn(0.1)
    if "embed_tokens" in name or name == "lm_head.weight":
        # Logits spread ~3 per unit-RMS hidden state: no near-ties under greedy, yet small enough
        # that float32 rounding stays far below the 1e-4 parity bound (also with tied embeddings).
        return randn(3.0 / math.sqrt(shape[1]))
    if "position_embeddings" in name:
        return randn(0.5)
    if name.endswith("gate.weight"):
        return randn(2.0 / math.sqrt(shape[1]))  # routing that differs token to token
    fan_in = math.prod(shape[1:]) if len(shape) != 3 else shape[2]
    return randn(1.0 / math.sqrt(fan_in))


def _follows_dtype(name: str, t: torch.Tensor) -> bool:
    """The gate bias stays float32, INT4 tensors keep theirs (int32, bf16 scales)."""
    return t.is_floating_point() and not name.endswith(("e_score_correction_bias", ".weight_scale"))


def int4_group_size(text: TextConfig) -> int:
    """The release's 32 inputs per scale, or the largest smaller group that divides both expert
    input dims (the `odd` preset's moe_intermediate_size of 48 needs 16)."""
    for size in (32, 16, 8):
        if text.hidden_size % size == 0 and text.moe_intermediate_size % size == 0:
            return size
    raise ValueError(f"no INT4 group size divides hidden {text.hidden_size} and {text.moe_intermediate_size}")


def _int4_writer(group_size: int) -> N.ExpertWriter:
    def write(module: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_int4(w, group_size)
        shape = torch.tensor(list(w.shape), dtype=torch.int32)
        return {f"{module}.weight_packed": pack_int4(q), f"{module}.weight_scale": scale,
                f"{module}.weight_shape": shape}

    return write


def _save_safetensors(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- config files ------------------------------------------------------------------------------


def config_json(spec: Preset, text: TextConfig, ids: dict[str, int], dialect: N.WeightDialect, dtype: str) -> dict:
    common = {
        "bos_token_id": ids["[BOS]"],
        "eos_token_id": ids["[EOS]"],
        "pad_token_id": ids["[PAD]"],
        "tie_word_embeddings": spec.tie_word_embeddings,
        "dtype": dtype,
    }
    if dialect == "original":
        return {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            **common,
            "media_placeholder_token_id": ids["<|media_pad|>"],
            "ignore_index": -100,
            "use_unified_vision_chunk": True,
            "video_placeholder": "<|kimi_k25_video_placeholder|>",
            "text_config": _text_json(text, spec, "original", common),
            "vision_config": _original_vision_json(spec.vision, text.hidden_size),
        }
    return {
        "architectures": ["Kimi_K25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        **common,
        "image_token_id": ids["<|media_pad|>"],
        "video_token_id": ids["<|kimi_k25_video_placeholder|>"],
        "vision_start_token_id": ids["<|media_begin|>"],
        "vision_end_token_id": ids["<|media_end|>"],
        "projection_hidden_size": spec.vision.hidden_size,
        "projection_layer_norm_eps": spec.vision.projector_ln_eps,
        "text_config": _text_json(text, spec, "transformers", common),
        "vision_config": _transformers_vision_json(spec.vision),
    }


def _text_json(t: TextConfig, spec: Preset, dialect: N.WeightDialect, common: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_type": "kimi_k2" if dialect == "original" else "deepseek_v3",
        **{k: getattr(t, k) for k in spec.text if k != "rope"},
        "vocab_size": t.vocab_size,
        "num_key_value_heads": t.num_attention_heads,
        "hidden_act": t.hidden_act,
        "num_nextn_predict_layers": 0,
        **{k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
    }
    rope = _rope_json(t.rope)
    if dialect == "original":
        body.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, rope_theta=t.rope.theta)
        if t.rope.kind == "yarn":
            body["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")} | {
                "type": "yarn"
            }
    else:
        body["rope_parameters"] = rope
    return body


def _rope_json(r: RopeConfig) -> dict[str, Any]:
    if r.kind == "default":
        return {"rope_type": "default", "rope_theta": r.theta}
    return {
        "rope_type": "yarn",
        "rope_theta": r.theta,
        "factor": r.factor,
        "original_max_position_embeddings": r.original_max_position_embeddings,
        "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow,
        "mscale": r.mscale,
        "mscale_all_dim": r.mscale_all_dim,
    }


def _original_vision_json(v: VisionConfig, text_hidden: int) -> dict[str, Any]:
    return {
        "model_type": "",
        "patch_size": v.patch_size,
        "init_pos_emb_height": v.pos_emb_height,
        "init_pos_emb_width": v.pos_emb_width,
        "init_pos_emb_time": v.pos_emb_time,
        "pos_emb_type": "divided_fixed",
        "vt_hidden_size": v.hidden_size,
        "vt_intermediate_size": v.intermediate_size,
        "vt_num_hidden_layers": v.num_hidden_layers,
        "vt_num_attention_heads": v.num_attention_heads,
        "merge_kernel_size": list(v.merge_kernel_size),
        "merge_type": "sd2_tpool",
        "mm_projector_type": "patchmerger",
        "mm_hidden_size": v.hidden_size,
        "projector_hidden_act": "gelu",
        "projector_ln_eps": v.projector_ln_eps,
        "text_hidden_size": text_hidden,
        "video_attn_type": "spatial_temporal",
    }


def _transformers_vision_json(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "kimi_k25_vision",
        "patch_size": v.patch_size,
        "pos_emb_height": v.pos_emb_height,
        "pos_emb_width": v.pos_emb_width,
        "pos_emb_time": v.pos_emb_time,
        "num_attention_heads": v.num_attention_heads,
        "num_hidden_layers": v.num_hidden_layers,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "hidden_act": v.hidden_act,
        "merge_kernel_size": list(v.merge_kernel_size),
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }


def processor_json(p: ProcessorConfig, dialect: N.WeightDialect) -> dict[str, Any]:
    media = {
        "in_patch_limit": p.max_patches,
        "patch_size": p.patch_size,
        "image_mean": list(p.image_mean),
        "image_std": list(p.image_std),
        "merge_kernel_size": p.merge_size,
        "fixed_output_tokens": None,
        "patch_limit_on_one_side": p.max_patches_per_side,
        "in_patch_limit_each_frame": p.max_patches,
        "in_patch_limit_video": None,
        "sample_fps": 2.0,
        "max_num_frames_each_video": None,
        "temporal_merge_kernel_size": 4,
        "timestamp_mode": "hh:mm:ss.fff",
    }
    if dialect == "original":
        return {"media_proc_cfg": media}
    return {
        "image_processor_type": "Kimi_K25ImageProcessor",
        "processor_class": "Kimi_K25Processor",
        "patch_size": p.patch_size,
        "merge_size": p.merge_size,
        "max_patches": p.max_patches,
        "size": {"max_height": p.max_patches_per_side, "max_width": p.max_patches_per_side},
        "image_mean": list(p.image_mean),
        "image_std": list(p.image_std),
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
    }


def model_config_of(preset: str, vocab_size: int) -> ModelConfig:
    """The ModelConfig a preset produces (for tests that need shapes without writing files)."""
    spec = PRESETS[preset]
    return ModelConfig(
        text=spec.text_config(vocab_size), vision=spec.vision, image_token_id=0,
        tie_word_embeddings=spec.tie_word_embeddings, dialect="transformers",
    )
