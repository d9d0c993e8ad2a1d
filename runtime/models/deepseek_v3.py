"""DeepseekV3-style language model: MLA attention over a latent KV cache, noaux_tc MoE.

Shapes use T = new tokens in this forward (all sequences, flattened), S = context length of one
sequence, H = attention heads, r = kv_lora_rank, p = qk_rope_head_dim, n = qk_nope_head_dim,
v = v_head_dim. The cache holds, per token per layer, only the latent [r + p]:
the normalised compressed KV and the roped shared key.

Parameter names equal transformers' `model.language_model.*` names, so the transformers
checkpoint layout maps by prefix alone (see runtime/checkpoint/names.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from runtime.models.common import activation
from runtime.models.config import RopeConfig, TextConfig, yarn_mscale
from runtime.models.experts import ExpertBank, ExpertFactory, Int4Layout, expert_factory

# --- latent KV cache interface ----------------------------------------------------------------


class KVBatch(Protocol):
    """The sequences of one forward and where their latents live. Rows of the flat token batch are
    grouped by sequence. Sequences with one new token may be attended together (decode_rows), in
    groups (decode_groups); the rest are attended one by one (per_sequence). The engine's paged cache implements this
    (tests/latent_kv.py has a contiguous one, the simplest to check the model against)."""

    def positions(self, device: torch.device | str) -> torch.Tensor:
        """Position of every new token [T]."""
        ...

    def write(self, layer: int, latent: torch.Tensor) -> None:
        """Store this forward's latents [T, r + p] of one layer."""
        ...

    def per_sequence(self) -> list[tuple[int, int, int]]:
        """(sequence index, first row, rows) of each sequence attended on its own."""
        ...

    def context(self, layer: int, seq: int) -> torch.Tensor:
        """All latents of sequence seq so far, this forward's included [S, r + p]."""
        ...

    def decode_rows(self) -> torch.Tensor | None:
        """Rows [B] of sequences with one new token that are attended together, or None."""
        ...

    def decode_groups(self) -> list[slice]:
        """Which of those rows (positions in decode_rows) are attended in one batch, group by group."""
        ...

    def decode_context(self, layer: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's latents padded to its longest [n, S, r + p] (valid until the next call), and
        which are real [n, S]."""
        ...

    def advance(self) -> None:
        """Every layer has run: commit the new tokens."""
        ...


# --- norms and rope ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale, exactly as transformers computes them."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pos_freqs = rope.theta**exponents
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    low, high = _yarn_correction_range(rope, dim)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _yarn_correction_range(rope: RopeConfig, dim: int) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        ratio = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return (dim * math.log(ratio)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def softmax_scale(cfg: TextConfig) -> float:
    scale = cfg.qk_head_dim**-0.5
    if cfg.rope.kind != "default" and cfg.rope.mscale_all_dim:
        m = yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, cfg: TextConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(cfg.rope, cfg.qk_rope_head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, p/2] of each rotation pair's angle (computed in float32, then cast)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, p] -> rotated, in split-halves layout. Interleaved checkpoints pair (2i, 2i+1);
        the output is de-interleaved the same way for q and k, which leaves q.k unchanged."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# --- attention ---------------------------------------------------------------------------------


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor | None:
    if q_len == 1:
        return None  # a single new token sees the whole context
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos  # [T, S]


class MLAttention(nn.Module):
    """Multi-head latent attention with a naive and a weight-absorbed path, side by side."""

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, qk, r, p = cfg.num_attention_heads, cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, r + p, bias=bias)
        self.kv_a_layernorm = RMSNorm(r, eps=1e-6)
        self.kv_b_proj = nn.Linear(r, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=bias)
        self.scale = softmax_scale(cfg)

    def project(
        self, x: torch.Tensor, rope: RotaryEmbedding, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> q_nope [T, H, n], q_rot [T, H, p], latent [T, r + p]."""
        cfg = self.cfg
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_rot = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv_nope, k_rot = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        # The query heads and the shared key rotated in one call, as H + 1 heads [T, H + 1, p]:
        # elementwise, so the same values as one call each, in half the small ops.
        rotated = rope.rotate(torch.cat([q_rot, k_rot[:, None, :]], dim=1), cos, sin)
        q_rot, k_rot = rotated[:, :-1], rotated[:, -1]
        latent = torch.cat([self.kv_a_layernorm(kv_nope), k_rot], dim=-1)
        return q_nope, q_rot, latent

    def _kv_b_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, n, r] and W_UV [H, v, r], views of kv_b_proj."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]

    def attend_naive(self, q_nope: torch.Tensor, q_rot: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Expand the context latents [S, r+p] to per-head K/V, then attend. Returns [T, H, v]."""
        cfg = self.cfg
        s, h = ctx.shape[0], cfg.num_attention_heads
        kv_nope, k_rot = ctx.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(kv_nope).view(s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, None, :].expand(s, h, cfg.qk_rope_head_dim)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        out = self._sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
        return out.transpose(0, 1)

    def attend_absorbed(self, q_nope: torch.Tensor, q_rot: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Fold W_UK into the query and W_UV after attention: attend over the latents directly."""
        cfg = self.cfg
        w_uk, w_uv = self._kv_b_weights()
        q_latent = torch.einsum("thn,hnr->htr", q_nope, w_uk)  # [H, T, r]
        q = torch.cat([q_latent, q_rot.transpose(0, 1)], dim=-1)  # [H, T, r + p]
        k = ctx[None].expand(cfg.num_attention_heads, -1, -1)  # [H, S, r + p], shared by all heads
        v = k[..., : cfg.kv_lora_rank]  # [H, S, r]
        out_latent = self._sdpa(q, k, v)  # [H, T, r]
        return torch.einsum("htr,hvr->thv", out_latent, w_uv)

    def attend_decodes(self, q_nope: torch.Tensor, q_rot: torch.Tensor, batch: KVBatch) -> torch.Tensor:
        """Decode for B sequences at once, one query each: q [B, H, n|p] in decode_rows order, over
        the latents group by group. Returns [B, H, v]."""
        cfg = self.cfg
        w_uk, w_uv = self._kv_b_weights()
        q = torch.cat([torch.einsum("bhn,hnr->bhr", q_nope, w_uk), q_rot], dim=-1)  # [B, H, r + p]
        out_latent = q.new_empty(q.shape[0], cfg.num_attention_heads, cfg.kv_lora_rank)
        for group, rows in enumerate(batch.decode_groups()):
            ctx, valid = batch.decode_context(self.layer_idx, group)
            out_latent[rows] = self.attend_latents(q[rows], ctx, valid)
        return torch.einsum("bhr,hvr->bhv", out_latent, w_uv)

    def attend_latents(self, q: torch.Tensor, ctx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """q [n, H, r + p] (W_UK folded in) over padded latents ctx [n, S, r + p], valid [n, S]:
        the attention-weighted latents [n, H, r]."""
        scores = torch.bmm(q, ctx.transpose(1, 2)).float() * self.scale  # [n, H, S]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(ctx.dtype)
        return torch.bmm(probs, ctx[..., : self.cfg.kv_lora_rank])

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = _causal_mask(q.shape[1], k.shape[1], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def forward(
        self,
        x: torch.Tensor,
        batch: KVBatch,
        rope: RotaryEmbedding,
        cos: torch.Tensor,
        sin: torch.Tensor,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        q_nope, q_rot, latent = self.project(x, rope, cos, sin)
        batch.write(self.layer_idx, latent)
        out = x.new_empty(x.shape[0], cfg.num_attention_heads, cfg.v_head_dim)
        rows = batch.decode_rows()
        if rows is not None:
            out[rows] = self.attend_decodes(q_nope[rows], q_rot[rows], batch)
        for seq, start, n in batch.per_sequence():
            ctx = batch.context(self.layer_idx, seq)
            # Prefill expands K/V (fewer FLOPs for many queries); decode attends over latents.
            use_absorbed = (n == 1) if absorbed is None else absorbed
            attend = self.attend_absorbed if use_absorbed else self.attend_naive
            out[start : start + n] = attend(q_nope[start : start + n], q_rot[start : start + n], ctx)
        return self.o_proj(out.reshape(x.shape[0], -1))


# --- feed-forward ------------------------------------------------------------------------------


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """noaux_tc routing: sigmoid scores; score + correction bias picks groups and experts;
    the plain scores of the picked experts, normalised, times routed_scaling_factor, weight them."""

    e_score_correction_bias: torch.Tensor

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if cfg.topk_group < cfg.n_group:  # else every group is kept (Kimi K2 has one group)
            choice = self._in_top_groups(choice)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids

    def _in_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """choice [T, E] with the experts outside the topk_group best groups (ranked by the sum of
        their two best biased scores) set to -inf."""
        cfg = self.cfg
        grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [T, groups]
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
        expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(-1, cfg.n_routed_experts)
        return choice.masked_fill(~expert_mask, float("-inf"))


ExpertDispatch = Callable[[ExpertBank, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def local_dispatch(experts: ExpertBank, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return experts(x, ids, weights)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig, expert_range: tuple[int, int] | None = None,
                 make_experts: ExpertFactory | None = None):
        super().__init__()
        first, count = expert_range if expert_range else (0, cfg.n_routed_experts)
        self.gate = MoEGate(cfg)
        self.experts = (make_experts or expert_factory(cfg))(first, count)
        self.shared_experts = (
            DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.hidden_act)
            if cfg.n_shared_experts
            else None
        )
        # How tokens meet their routed experts. Expert parallelism replaces this with a dispatch that
        # sends x, ids and weights to every rank and sums the ranks' partial outputs.
        self.dispatch: ExpertDispatch = local_dispatch

    def forward(self, x: torch.Tensor, routed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """routed: where the gate's expert ids [T, k] are appended, when a caller asked for them."""
        weights, ids = self.gate(x)
        if routed is not None:
            routed.append(ids)
        out = self.dispatch(self.experts, x, ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# --- decoder -----------------------------------------------------------------------------------


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, expert_range: tuple[int, int] | None,
                 make_experts: ExpertFactory | None = None):
        super().__init__()
        self.self_attn = MLAttention(cfg, layer_idx)
        self.mlp: nn.Module = (
            MoE(cfg, expert_range, make_experts)
            if cfg.is_moe_layer(layer_idx)
            else DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: KVBatch, rope: RotaryEmbedding, cos, sin, absorbed=None,
                routed: list[torch.Tensor] | None = None):
        x = x + self.self_attn(self.input_layernorm(x), batch, rope, cos, sin, absorbed)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, routed) if isinstance(self.mlp, MoE) else self.mlp(h))


class DeepseekV3LM(nn.Module):
    def __init__(self, cfg: TextConfig, tie_word_embeddings: bool = False,
                 expert_range: tuple[int, int] | None = None, int4: Int4Layout | None = None):
        """int4: routed experts kept packed in this INT4 layout (all layers share one scratch)."""
        super().__init__()
        self.cfg = cfg
        self.tie_word_embeddings = tie_word_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        make_experts = expert_factory(cfg, int4)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, expert_range, make_experts) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        if not tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, embeds: torch.Tensor, batch: KVBatch, absorbed: bool | None = None,
                routed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """embeds [T, hidden] -> final hidden states [T, hidden]; caches this forward's latents.
        routed: when given, each MoE layer appends its gate's expert ids [T, k] to it, in layer order."""
        cos, sin = self.rotary(batch.positions(embeds.device), embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, batch, self.rotary, cos, sin, absorbed, routed)
        batch.advance()
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight)
