"""`plan`: memory per expert-parallel rank of a checkpoint, from its config.json alone.

Parameters are counted from the config's dimensions exactly as DeepseekV3LM and VisionTower build
them (tests check the counts against constructed modules). The layout is the runtime's own
(runtime/lm_service/expert_parallel.py): expert parallelism splits only the routed experts; rank 0
holds everything else (embeddings, attention, dense layers, shared experts, gates, lm_head) and the
whole latent KV cache; ranks 1..E-1 hold only their routed experts. expert_range gives the first
n % E ranks one expert more, so rank 0 holds ceil(n / E) per layer and is always the largest.
The vision tower runs in its own pool (deploy/cluster.yaml gives it its own device), so it is
reported apart from the LM ranks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from runtime.errors import UnsupportedConfigError
from runtime.lm_service.expert_parallel import expert_range
from runtime.models.config import ModelConfig, TextConfig, VisionConfig

GiB = 2**30
BF16_BITS = 16
_DTYPE_BITS = {"bfloat16": 16, "float16": 16, "float32": 32}
ExpertChoice = Literal["int4", "bf16", "auto"]


# --- parameter counts, as the modules build them -----------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool = False) -> int:
    return n_in * n_out + (n_out if bias else 0)


def attention_params(t: TextConfig) -> int:
    """One MLAttention layer (its two RMSNorms included)."""
    h, bias = t.num_attention_heads, t.attention_bias
    if t.q_lora_rank is None:
        q = _linear(t.hidden_size, h * t.qk_head_dim)
    else:
        q = _linear(t.hidden_size, t.q_lora_rank, bias) + t.q_lora_rank + _linear(t.q_lora_rank, h * t.qk_head_dim)
    kv = _linear(t.hidden_size, t.latent_dim, bias) + t.kv_lora_rank
    kv += _linear(t.kv_lora_rank, h * (t.qk_nope_head_dim + t.v_head_dim))
    return q + kv + _linear(h * t.v_head_dim, t.hidden_size, bias)


def mlp_params(hidden: int, intermediate: int) -> int:
    """A gated MLP (gate, up, down), as DenseMLP, one routed expert and the shared experts are."""
    return 3 * hidden * intermediate


def routed_expert_params(t: TextConfig) -> int:
    """One routed expert of one layer."""
    return mlp_params(t.hidden_size, t.moe_intermediate_size)


def moe_layers(t: TextConfig) -> int:
    return sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by part. `gate_bias` is the float32 e_score_correction_bias (a stored buffer)."""

    embeddings: int  # embed_tokens, plus lm_head unless tied
    attention: int
    dense_mlp: int
    shared_experts: int
    gates: int
    gate_bias: int
    norms: int  # the decoder layers' two RMSNorms and the final one
    routed_experts: int  # all of them
    vision: int  # MoonViT + patch-merger projector

    @property
    def lm_non_expert(self) -> int:
        """What rank 0 holds besides its routed experts, gate bias excluded (it stays float32)."""
        return self.embeddings + self.attention + self.dense_mlp + self.shared_experts + self.gates + self.norms

    @property
    def lm_total(self) -> int:
        return self.lm_non_expert + self.gate_bias + self.routed_experts

    @property
    def total(self) -> int:
        return self.lm_total + self.vision


def lm_param_counts(t: TextConfig, tie_word_embeddings: bool) -> dict[str, int]:
    n_moe = moe_layers(t)
    n_dense = t.num_hidden_layers - n_moe
    return {
        "embeddings": t.vocab_size * t.hidden_size * (1 if tie_word_embeddings else 2),
        "attention": t.num_hidden_layers * attention_params(t),
        "dense_mlp": n_dense * mlp_params(t.hidden_size, t.intermediate_size),
        "shared_experts": n_moe * mlp_params(t.hidden_size, t.moe_intermediate_size * t.n_shared_experts),
        "gates": n_moe * t.n_routed_experts * t.hidden_size,
        "gate_bias": n_moe * t.n_routed_experts,
        "norms": (2 * t.num_hidden_layers + 1) * t.hidden_size,
        "routed_experts": n_moe * t.n_routed_experts * routed_expert_params(t),
    }


def vision_params(v: VisionConfig, text_hidden_size: int) -> int:
    """VisionTower: patch embedding, position table, encoder layers, final norm, projector."""
    d, i = v.hidden_size, v.intermediate_size
    layer = 4 * _linear(d, d, True) + _linear(d, i, True) + _linear(i, d, True) + 4 * d  # attn, mlp, 2 LayerNorms
    patch = 3 * v.patch_size**2 * d + d + v.pos_emb_height * v.pos_emb_width * d
    merged = d * v.merge_area
    projector = 2 * d + _linear(merged, merged, True) + _linear(merged, text_hidden_size, True)
    return patch + v.num_hidden_layers * layer + 2 * d + projector


def param_counts(cfg: ModelConfig) -> ParamCounts:
    return ParamCounts(**lm_param_counts(cfg.text, cfg.tie_word_embeddings),
                       vision=vision_params(cfg.vision, cfg.text.hidden_size))


# --- formats -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertFormat:
    name: str
    bits_per_weight: float  # scales included


INT4 = ExpertFormat("int4 (group 32, bf16 scales)", 4 + BF16_BITS / 32)


def expert_format(cfg: ModelConfig, choice: ExpertChoice) -> ExpertFormat:
    """int4: 4 bits plus a bf16 scale per 32 weights (4.5 bits). auto: the config's
    quantization_config (weights num_bits + a bf16 scale per group_size) if it has one, else the
    checkpoint's dtype."""
    if choice == "int4":
        return INT4
    if choice == "bf16":
        return ExpertFormat("bf16", BF16_BITS)
    if cfg.int4 is not None:  # quantization_config, parsed and checked once (runtime.models.int4)
        group = cfg.int4.group_size
        return ExpertFormat(f"int4 (group {group}, bf16 scales)", 4 + BF16_BITS / group)
    dtype = cfg.raw.get("dtype") or cfg.raw.get("torch_dtype") or cfg.raw.get("text_config", {}).get("dtype")
    dtype = dtype or "bfloat16"
    if dtype not in _DTYPE_BITS:
        raise UnsupportedConfigError(f"checkpoint dtype {dtype!r}: plan knows {sorted(_DTYPE_BITS)}")
    return ExpertFormat(dtype, _DTYPE_BITS[dtype])


def kv_bytes_per_token(t: TextConfig, fp8: bool = False, dtype_bits: int = BF16_BITS) -> int:
    """MLA caches (kv_lora_rank + qk_rope_head_dim) values per token per layer, nothing per head."""
    return t.num_hidden_layers * t.latent_dim * (1 if fp8 else dtype_bits // 8)


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanInputs:
    context: int
    batch: int
    experts: ExpertFormat
    kv_fp8: bool = False
    dtype_bits: int = BF16_BITS  # everything but the routed experts, and the KV cache unless fp8
    reserve_gib: float = 8.0  # per rank: activations, workspace, the framework's own context


@dataclass(frozen=True)
class RankMemory:
    ep_size: int
    experts_per_layer: int  # on rank 0, the largest share
    rank0_bytes: int  # non-expert weights + KV cache + its experts + reserve
    worker_bytes: int  # ranks 1..E-1: their experts + reserve (0 when E == 1)

    def fits(self, device_bytes: int) -> bool:
        return self.rank0_bytes <= device_bytes  # rank 0 is the largest rank


@dataclass(frozen=True)
class Plan:
    params: ParamCounts
    inputs: PlanInputs
    n_routed_experts: int
    lm_non_expert_bytes: int  # rank 0's fixed weights (gate bias in float32 included)
    expert_slot_bytes: float  # one expert index over every MoE layer
    vision_bytes: int
    kv_bytes_per_token: int

    @property
    def routed_expert_bytes(self) -> int:
        return math.ceil(self.expert_slot_bytes * self.n_routed_experts)

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.inputs.context * self.inputs.batch

    @property
    def reserve_bytes(self) -> int:
        return int(self.inputs.reserve_gib * GiB)

    def rank(self, ep_size: int) -> RankMemory:
        """Memory of rank 0 and of the largest worker rank at this EP size."""
        first = expert_range(self.n_routed_experts, ep_size, 0)[1]
        rank0 = self.lm_non_expert_bytes + self.kv_bytes + math.ceil(first * self.expert_slot_bytes)
        worker = 0
        if ep_size > 1:
            worker = math.ceil(expert_range(self.n_routed_experts, ep_size, 1)[1] * self.expert_slot_bytes)
            worker += self.reserve_bytes
        return RankMemory(ep_size, first, rank0 + self.reserve_bytes, worker)

    def min_ep_size(self, device_bytes: int) -> int | None:
        """The smallest EP size whose rank 0 fits, or None if even one expert per rank does not."""
        return next((e for e in range(1, self.n_routed_experts + 1) if self.rank(e).fits(device_bytes)), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "params": asdict(self.params) | {"lm_total": self.params.lm_total, "total": self.params.total},
            "inputs": asdict(self.inputs),
            "bytes": {
                "lm_non_expert": self.lm_non_expert_bytes,
                "routed_experts": self.routed_expert_bytes,
                "vision": self.vision_bytes,
                "kv_per_token": self.kv_bytes_per_token,
                "kv": self.kv_bytes,
                "reserve_per_rank": self.reserve_bytes,
            },
        }


def make_plan(cfg: ModelConfig, inputs: PlanInputs) -> Plan:
    params = param_counts(cfg)
    t = cfg.text
    return Plan(
        params=params,
        inputs=inputs,
        n_routed_experts=t.n_routed_experts,
        lm_non_expert_bytes=params.lm_non_expert * inputs.dtype_bits // 8 + 4 * params.gate_bias,
        expert_slot_bytes=moe_layers(t) * routed_expert_params(t) * inputs.experts.bits_per_weight / 8,
        vision_bytes=params.vision * inputs.dtype_bits // 8,
        kv_bytes_per_token=kv_bytes_per_token(t, inputs.kv_fp8, inputs.dtype_bits),
    )


# --- report --------------------------------------------------------------------------------------


def ep_sizes_to_show(n_experts: int, ep_size: int | None, fitting: int | None) -> list[int]:
    """The asked EP size, or the powers of two up to n_experts; plus the smallest that fits."""
    sizes = {ep_size} if ep_size else {2**i for i in range(n_experts.bit_length()) if 2**i <= n_experts}
    if fitting:
        sizes.add(fitting)
    return sorted(sizes)


def report(plan: Plan, ep_size: int | None = None, device_gib: float | None = None) -> dict[str, Any]:
    """The plan plus per-rank memory at the EP sizes shown, and the smallest EP size that fits."""
    device = int(device_gib * GiB) if device_gib else None
    fitting = plan.min_ep_size(device) if device else None
    ranks = [plan.rank(e) for e in ep_sizes_to_show(plan.n_routed_experts, ep_size, fitting)]
    return plan.to_json() | {
        "experts_format": plan.inputs.experts.name,
        "device_memory_gib": device_gib,
        "ranks": [asdict(r) | ({"fits": r.fits(device)} if device else {}) for r in ranks],
        "min_ep_size": fitting,
    }


def render(rep: dict[str, Any]) -> str:
    p, b, i = rep["params"], rep["bytes"], rep["inputs"]
    rest = p["lm_total"] - p["routed_experts"]
    cache = "fp8" if i["kv_fp8"] else f"{i['dtype_bits']}-bit"
    lines = [
        f"parameters: {_b(p['total'])} = LM {_b(p['lm_total'])} (routed experts {_b(p['routed_experts'])}, "
        f"rest {_b(rest)}) + vision {_b(p['vision'])}",
        f"  rest of the LM: embeddings {_b(p['embeddings'])}, attention {_b(p['attention'])}, dense MLPs "
        f"{_b(p['dense_mlp'])}, shared experts {_b(p['shared_experts'])}, gates {_b(p['gates'] + p['gate_bias'])}",
        f"weights: routed experts {rep['experts_format']}, {i['experts']['bits_per_weight']:g} bits/weight: "
        f"{_gib(b['routed_experts'])}; rest of the LM {_gib(b['lm_non_expert'])} ({i['dtype_bits']}-bit); "
        f"vision {_gib(b['vision'])} (its own pool, not on the LM ranks)",
        f"KV cache ({cache}): {b['kv_per_token']:,} bytes/token; context {i['context']:,} x batch {i['batch']} "
        f"= {_gib(b['kv'])}, all on rank 0",
        f"reserve: {i['reserve_gib']:g} GiB on every rank (activations, workspace)",
        "",
        _rank_table(rep),
    ]
    if rep["device_memory_gib"]:
        fit = rep["min_ep_size"]
        lines.append(f"smallest EP size that fits {rep['device_memory_gib']:g} GiB: "
                     + (str(fit) if fit else "none (rank 0's weights, KV cache and reserve alone do not fit)"))
    return "\n".join(lines)


def _rank_table(rep: dict[str, Any]) -> str:
    device = rep["device_memory_gib"]
    head = f"{'EP':>4} {'experts/layer (rank 0)':>23} {'rank 0 GiB':>11} {'ranks 1.. GiB':>14}"
    rows = [head + (f" {'fits ' + format(device, 'g') + ' GiB':>14}" if device else "")]
    for r in rep["ranks"]:
        worker = f"{r['worker_bytes'] / GiB:.1f}" if r["ep_size"] > 1 else "-"
        row = f"{r['ep_size']:>4} {r['experts_per_layer']:>23} {r['rank0_bytes'] / GiB:>11.1f} {worker:>14}"
        rows.append(row + (f" {'yes' if r['fits'] else 'no':>14}" if device else ""))
    return "\n".join(rows)


def _b(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"
