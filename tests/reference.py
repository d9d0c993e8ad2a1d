"""The oracle: transformers 5.18's own Kimi-K2.5 model and image processor, for tests only.

- transformers reads weights of both layouts itself (its conversion mapping renames the original
  release's tensors, unfuses `wqkv` and undoes the rope interleave). It reads only its own config
  keys, so an original-dialect config.json is translated here, key by key, into a temporary folder
  that links the same weight files.
- Kimi_K25ImageProcessor is declared torchvision-only. PyPI's torchvision is a CUDA build whose
  native ops cannot load beside the CPU torch; declaring the two op schemas its import registers
  (`torchvision::nms`, `torchvision::qnms`) lets it import, and the processor's resize/pad is pure torch.
  The runtime itself never imports torchvision.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch


@cache
def install_torchvision_shim() -> None:
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    for op in ("nms", "qnms"):
        with contextlib.suppress(RuntimeError):  # already defined
            torch.library.define(f"torchvision::{op}", schema)
    import torchvision  # noqa: F401


def transformers_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Translate an original-release config.json into transformers' kimi_k25 keys (independently
    of the runtime's own parser, so the two can disagree and a test can notice)."""
    if "vt_hidden_size" not in (raw.get("vision_config") or {}):
        return raw
    v, t = raw["vision_config"], dict(raw["text_config"])
    t["model_type"] = "deepseek_v3"
    rope = dict(t.pop("rope_scaling", None) or {"rope_type": "default"})
    rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
    rope["rope_theta"] = t.pop("rope_theta", 10000.0)
    t["rope_parameters"] = rope
    return {
        "architectures": ["Kimi_K25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": t,
        "vision_config": {
            "patch_size": v["patch_size"],
            "pos_emb_height": v["init_pos_emb_height"],
            "pos_emb_width": v["init_pos_emb_width"],
            "pos_emb_time": v["init_pos_emb_time"],
            "num_attention_heads": v["vt_num_attention_heads"],
            "num_hidden_layers": v["vt_num_hidden_layers"],
            "hidden_size": v["vt_hidden_size"],
            "intermediate_size": v["vt_intermediate_size"],
            "merge_kernel_size": v["merge_kernel_size"],
        },
        "projection_hidden_size": v["mm_hidden_size"],
        "projection_layer_norm_eps": v["projector_ln_eps"],
        "image_token_id": raw["media_placeholder_token_id"],
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "pad_token_id": raw.get("pad_token_id"),
        **({"quantization_config": raw["quantization_config"]} if "quantization_config" in raw else {}),
    }


def _transformers_view(model_dir: Path) -> Path:
    raw = json.loads((model_dir / "config.json").read_text())
    translated = transformers_config(raw)
    if translated is raw:
        return model_dir
    view = Path(tempfile.mkdtemp(prefix="ref-view-"))
    for f in model_dir.iterdir():
        if f.name != "config.json":
            os.symlink(f.resolve(), view / f.name)
    (view / "config.json").write_text(json.dumps(translated))
    return view


_FUSABLE_EXPERT = re.compile(
    r"^(model\.language_model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$"
)


def write_dequantized_twin(src: Path, out: Path) -> Path:
    """The float32 twin of an INT4 checkpoint, what transformers runs as the reference: every packed
    weight dequantized through compressed-tensors' own unpacking (q * scale, exact in float32), the
    transformers dialect's experts fused as its float checkpoints store them, config.json without
    quantization_config, every other file linked."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file, save_file

    stored: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        stored.update(load_file(str(f)))
    tensors = {n: t for n, t in stored.items() if not n.endswith((".weight_packed", ".weight_scale", ".weight_shape"))}
    for name in (n for n in stored if n.endswith(".weight_packed")):
        module = name.removesuffix(".weight_packed")
        shape, scale = stored[f"{module}.weight_shape"].tolist(), stored[f"{module}.weight_scale"].float()
        q = unpack_from_int32(stored[name], 4, torch.Size(shape))
        tensors[f"{module}.weight"] = q.float() * scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
    out.mkdir(parents=True)
    save_file(_fuse_transformers_experts(tensors), str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["text_config"].pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.startswith("model"):
            os.symlink(f.resolve(), out / f.name)
    return out


def _fuse_transformers_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `model.language_model...experts.E.{gate,up,down}_proj.weight` -> fused
    `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]."""
    parts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in tensors.items():
        m = _FUSABLE_EXPERT.match(name)
        if m:
            parts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, pieces in parts.items():
        n = 1 + max(e for e, _ in pieces)
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([pieces[e, "gate"], pieces[e, "up"]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([pieces[e, "down"] for e in range(n)])
    return out


@cache
def reference_model(model_dir: str) -> Any:
    from transformers import Kimi_K25ForConditionalGeneration

    model = Kimi_K25ForConditionalGeneration.from_pretrained(
        str(_transformers_view(Path(model_dir))), dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def reference_image_processor(patch_size: int, merge_size: int, max_patches: int, max_side: int) -> Any:
    install_torchvision_shim()
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    return Kimi_K25ImageProcessor(
        patch_size=patch_size, merge_size=merge_size, max_patches=max_patches,
        size={"max_height": max_side, "max_width": max_side},
    )


def reference_greedy(ref: Any, inputs: dict, steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens (its own KV cache) and the prefill logits [S, vocab]."""
    tokens, prefill_logits, _ = reference_decode(ref, inputs, steps)
    return tokens, prefill_logits


def reference_decode(ref: Any, inputs: dict, steps: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """reference_greedy, plus the logits each greedy token was picked from [steps, vocab]."""
    with torch.no_grad():
        out = ref(**inputs, use_cache=True)
        prefill_logits = out.logits[0]
        step_logits = [out.logits[0, -1]]
        for _ in range(steps - 1):
            token = int(step_logits[-1].argmax())
            out = ref(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            step_logits.append(out.logits[0, -1])
    logits = torch.stack(step_logits)
    return logits.argmax(dim=-1).tolist(), prefill_logits, logits


def reference_routing(ref: Any, inputs: dict) -> torch.Tensor:
    """The expert ids transformers' own gate (DeepseekV3TopkRouter, hooked) picks in one forward
    over inputs, for every token and MoE layer in order: [S, MoE layers, k], in the gate's order."""
    picked: list[torch.Tensor] = []
    gates = [m for m in ref.modules() if type(m).__name__ == "DeepseekV3TopkRouter"]
    hooks = [g.register_forward_hook(lambda _m, _args, out: picked.append(out[2])) for g in gates]
    try:
        with torch.no_grad():
            ref(**inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(picked) == len(gates), "every MoE layer's gate runs once per forward"
    return torch.stack(picked, dim=1)
