"""Typed model configuration read from a checkpoint's config.json, in either dialect.

Two dialects of the same family exist in the wild:
- "original": the moonshotai release (`vt_*` vision keys, `mm_hidden_size`, `projector_ln_eps`,
  `media_placeholder_token_id`, text `model_type` `kimi_k2` or `deepseek_v3`, `rope_scaling`).
- "transformers": transformers 5.18's `kimi_k25` (`vision_config.hidden_size`, `image_token_id`,
  `projection_hidden_size`, `rope_parameters`).
Either may carry a compressed-tensors `quantization_config` (runtime/models/int4.py reads it).
Both parse into the same frozen dataclasses; nothing downstream looks at raw dicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.errors import CheckpointError, UnsupportedConfigError
from runtime.models.int4_scheme import Int4Scheme, parse_quantization_config

ConfigDialect = Literal["original", "transformers"]


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_shared_experts: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the compressed KV plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    pos_emb_height: int
    pos_emb_width: int
    pos_emb_time: int
    merge_kernel_size: tuple[int, int]
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    projector_ln_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def merge_area(self) -> int:
        return self.merge_kernel_size[0] * self.merge_kernel_size[1]


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    tie_word_embeddings: bool
    dialect: ConfigDialect
    video_token_id: int = 163840  # transformers' default; embedded as token 0 like image placeholders
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    int4: Int4Scheme | None = None  # quantization_config: which Linear modules may be stored INT4
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# --- parsing -----------------------------------------------------------------------------------

_SUPPORTED_ARCHITECTURES = {"KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration"}
_SUPPORTED_TEXT_MODEL_TYPES = {"deepseek_v3", "kimi_k2"}
_SUPPORTED_ACTS = {"silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu", "quick_gelu"}


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"no config.json in {model_dir}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return parse_model_config(raw)


def detect_config_dialect(raw: dict[str, Any]) -> ConfigDialect:
    vision = raw.get("vision_config") or {}
    if "vt_hidden_size" in vision or "media_placeholder_token_id" in raw:
        return "original"
    return "transformers"


def parse_model_config(raw: dict[str, Any]) -> ModelConfig:
    _check_architecture(raw)
    dialect = detect_config_dialect(raw)
    text_raw = raw.get("text_config")
    if not isinstance(text_raw, dict):
        raise UnsupportedConfigError("config.json has no 'text_config' object")
    text = _parse_text_config(text_raw)
    vision_raw = raw.get("vision_config") or {}
    if dialect == "original":
        vision = _parse_original_vision(vision_raw)
        image_token_id = _require(raw, "media_placeholder_token_id", "config.json")
        hidden = vision_raw.get("mm_hidden_size", vision.hidden_size)
        tie_default = False
    else:
        vision = _parse_transformers_vision(vision_raw, raw.get("projection_layer_norm_eps", 1e-5))
        image_token_id = raw.get("image_token_id", 163605)
        hidden = raw.get("projection_hidden_size", 1152)
        tie_default = True  # Kimi_K25Config's own default
    if hidden != vision.hidden_size:
        raise UnsupportedConfigError(
            f"projector input size {hidden} differs from the vision hidden size {vision.hidden_size}"
        )
    tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", tie_default))
    eos = raw.get("eos_token_id", text_raw.get("eos_token_id"))
    return ModelConfig(
        text=text,
        vision=vision,
        image_token_id=int(image_token_id),
        video_token_id=int(raw.get("video_token_id", 163840)),
        tie_word_embeddings=bool(tie),
        dialect=dialect,
        bos_token_id=raw.get("bos_token_id", text_raw.get("bos_token_id")),
        eos_token_ids=_as_id_tuple(eos),
        pad_token_id=raw.get("pad_token_id", text_raw.get("pad_token_id")),
        int4=parse_quantization_config(raw),
        raw=raw,
    )


def _check_architecture(raw: dict[str, Any]) -> None:
    archs = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type not in (None, "kimi_k25") or (archs and not set(archs) & _SUPPORTED_ARCHITECTURES):
        raise UnsupportedConfigError(
            f"unsupported architecture {archs or model_type!r}: this runtime serves Kimi-K2.5-style "
            f"models ({sorted(_SUPPORTED_ARCHITECTURES)})"
        )


def _parse_text_config(t: dict[str, Any]) -> TextConfig:
    model_type = t.get("model_type", "deepseek_v3")
    if model_type not in _SUPPORTED_TEXT_MODEL_TYPES:
        raise UnsupportedConfigError(f"text_config.model_type {model_type!r} is not a DeepseekV3-style LM")
    if t.get("scoring_func", "sigmoid") != "sigmoid":
        raise UnsupportedConfigError(f"text_config.scoring_func {t['scoring_func']!r}: only sigmoid is supported")
    act = t.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTS:
        raise UnsupportedConfigError(f"text_config.hidden_act {act!r} is not supported")
    heads = _require(t, "num_attention_heads", "text_config")
    if t.get("num_key_value_heads", heads) != heads:
        raise UnsupportedConfigError("text_config.num_key_value_heads must equal num_attention_heads for MLA")
    n_experts = _require(t, "n_routed_experts", "text_config")
    n_group = t.get("n_group") or 1
    if n_experts % n_group:
        raise UnsupportedConfigError(f"text_config.n_routed_experts {n_experts} is not divisible by n_group {n_group}")
    q_lora = t.get("q_lora_rank")
    nope = _require(t, "qk_nope_head_dim", "text_config")
    return TextConfig(
        vocab_size=_require(t, "vocab_size", "text_config"),
        hidden_size=_require(t, "hidden_size", "text_config"),
        intermediate_size=_require(t, "intermediate_size", "text_config"),
        moe_intermediate_size=_require(t, "moe_intermediate_size", "text_config"),
        num_hidden_layers=_require(t, "num_hidden_layers", "text_config"),
        num_attention_heads=heads,
        n_shared_experts=t.get("n_shared_experts") or 0,
        n_routed_experts=n_experts,
        num_experts_per_tok=_require(t, "num_experts_per_tok", "text_config"),
        n_group=n_group,
        topk_group=t.get("topk_group") or 1,
        routed_scaling_factor=float(t.get("routed_scaling_factor", 1.0)),
        norm_topk_prob=bool(t.get("norm_topk_prob", True)),
        first_k_dense_replace=t.get("first_k_dense_replace") or 0,
        kv_lora_rank=_require(t, "kv_lora_rank", "text_config"),
        q_lora_rank=int(q_lora) if q_lora else None,
        qk_nope_head_dim=nope,
        qk_rope_head_dim=_require(t, "qk_rope_head_dim", "text_config"),
        v_head_dim=t.get("v_head_dim") or nope,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(t.get("max_position_embeddings", 4096)),
        rope=_parse_rope(t),
        rope_interleave=bool(t.get("rope_interleave", True)),
        attention_bias=bool(t.get("attention_bias", False)),
        hidden_act=act,
    )


def _parse_rope(t: dict[str, Any]) -> RopeConfig:
    """`rope_parameters` (transformers 5) or legacy `rope_scaling` + `rope_theta`."""
    params = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", t.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind != "yarn":
        raise UnsupportedConfigError(f"text_config rope type {kind!r}: only default and yarn are supported")
    max_pos = int(t.get("max_position_embeddings", 4096))
    original = int(params.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    return RopeConfig(
        theta=theta,
        kind="yarn",
        factor=float(factor) if factor is not None else max_pos / original,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _parse_original_vision(v: dict[str, Any]) -> VisionConfig:
    return VisionConfig(
        patch_size=v.get("patch_size", 14),
        hidden_size=_require(v, "vt_hidden_size", "vision_config"),
        intermediate_size=_require(v, "vt_intermediate_size", "vision_config"),
        num_hidden_layers=_require(v, "vt_num_hidden_layers", "vision_config"),
        num_attention_heads=_require(v, "vt_num_attention_heads", "vision_config"),
        pos_emb_height=v.get("init_pos_emb_height", 64),
        pos_emb_width=v.get("init_pos_emb_width", 64),
        pos_emb_time=v.get("init_pos_emb_time", 4),
        merge_kernel_size=_pair(v.get("merge_kernel_size", (2, 2))),
        projector_ln_eps=float(v.get("projector_ln_eps", 1e-5)),
    )


def _parse_transformers_vision(v: dict[str, Any], projector_eps: float) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _SUPPORTED_ACTS:
        raise UnsupportedConfigError(f"vision_config.hidden_act {act!r} is not supported")
    return VisionConfig(
        patch_size=v.get("patch_size", 14),
        hidden_size=v.get("hidden_size", 1152),
        intermediate_size=v.get("intermediate_size", 4304),
        num_hidden_layers=v.get("num_hidden_layers", 27),
        num_attention_heads=v.get("num_attention_heads", 16),
        pos_emb_height=v.get("pos_emb_height", 64),
        pos_emb_width=v.get("pos_emb_width", 64),
        pos_emb_time=v.get("pos_emb_time", 4),
        merge_kernel_size=_pair(v.get("merge_kernel_size", (2, 2))),
        hidden_act=act,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        projector_ln_eps=float(projector_eps),
    )


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise UnsupportedConfigError(f"{where} is missing required key {key!r}")
    return d[key]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _as_id_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, int):
        return (v,)
    return tuple(int(x) for x in v)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
