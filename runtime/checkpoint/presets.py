"""Shapes of the random checkpoints `make-checkpoint` builds.

- tiny:    smallest useful shapes, YaRN rope, q_lora, 2 expert groups: unit tests and the demo.
- mla576:  the real latent sizes (kv_lora_rank 512 + qk_rope_head_dim 64 = 576), so vLLM's CPU
           MLA kernel accepts it: benchmarks.
- odd:     q_lora_rank unset, v_head_dim != qk_nope_head_dim, 2 dense layers, 4 groups with
           topk_group 2, non-interleaved plain rope, attention biases, tied embeddings,
           norm_topk_prob off, 3 vision heads: catches code that only works for one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtime.images import ProcessorConfig
from runtime.models.config import RopeConfig, TextConfig, VisionConfig

_YARN = RopeConfig(
    theta=50000.0, kind="yarn", factor=4.0, original_max_position_embeddings=1024,
    beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
)


@dataclass(frozen=True)
class Preset:
    text: dict[str, Any]
    vision: VisionConfig
    processor: ProcessorConfig
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def text_config(self, vocab_size: int) -> TextConfig:
        return TextConfig(vocab_size=vocab_size, **self.text)


_TINY_VISION = VisionConfig(
    patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, merge_kernel_size=(2, 2),
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        text=dict(
            hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096, rope=_YARN,
        ),
        vision=_TINY_VISION,
        processor=ProcessorConfig(max_patches=256, max_patches_per_side=24),
    ),
    "mla576": Preset(
        text=dict(
            hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
            n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
            first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=96, qk_nope_head_dim=64,
            qk_rope_head_dim=64, v_head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=4096, rope=_YARN,
        ),
        vision=_TINY_VISION,
        processor=ProcessorConfig(max_patches=1024, max_patches_per_side=64),
    ),
    "odd": Preset(
        text=dict(
            hidden_size=96, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=3, n_shared_experts=2, n_routed_experts=12, num_experts_per_tok=3,
            n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
            first_k_dense_replace=2, kv_lora_rank=40, q_lora_rank=None, qk_nope_head_dim=24,
            qk_rope_head_dim=16, v_head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=2048,
            rope=RopeConfig(theta=10000.0), rope_interleave=False, attention_bias=True,
        ),
        vision=VisionConfig(
            patch_size=14, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
            pos_emb_height=12, pos_emb_width=12, pos_emb_time=4, merge_kernel_size=(2, 2),
        ),
        processor=ProcessorConfig(max_patches=400, max_patches_per_side=30),
        tie_word_embeddings=True,
    ),
}
