from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint.loader import load_language_model, load_vision, routed_expert_bytes
from runtime.errors import (
    CorruptCheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedConfigError,
)
from runtime.models.config import load_model_config


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path: Path, edit) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dialect", ["transformers", "original"])
def test_missing_tensor_is_named(checkpoints, tmp_path: Path, dialect: str) -> None:
    path = _copy(checkpoints("tiny", dialect), tmp_path / "ckpt")
    name = {"transformers": "model.language_model.layers.1.self_attn.kv_a_layernorm.weight",
            "original": "language_model.model.layers.1.self_attn.kv_a_layernorm.weight"}[dialect]
    _edit_weights(path, lambda t: t.pop(name))
    with pytest.raises(MissingTensorError, match="kv_a_layernorm"):
        load_language_model(path)


def test_wrong_shape_is_named(checkpoints, tmp_path: Path) -> None:
    path = _copy(checkpoints("tiny"), tmp_path / "ckpt")
    name = "model.vision_tower.layers.0.attn.q_proj.weight"
    _edit_weights(path, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(ShapeMismatchError, match=r"q_proj.weight.*\[3, 3\]"):
        load_vision(path)


def test_unexpected_tensor_is_named(checkpoints, tmp_path: Path) -> None:
    path = _copy(checkpoints("tiny"), tmp_path / "ckpt")
    _edit_weights(path, lambda t: t.__setitem__("model.language_model.layers.0.mlp.mystery", torch.zeros(2)))
    with pytest.raises(UnexpectedTensorError, match="mystery"):
        load_language_model(path)


def test_unknown_architecture(checkpoints, tmp_path: Path) -> None:
    path = _copy(checkpoints("tiny"), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="LlamaForCausalLM"):
        load_model_config(path)


def test_incomplete_quantization_config_is_refused_by_key(checkpoints, tmp_path: Path) -> None:
    path = _copy(checkpoints("tiny"), tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match="quantization_config.quantization_status"):
        load_language_model(path)


def test_corrupt_safetensors(checkpoints, tmp_path: Path) -> None:
    path = _copy(checkpoints("tiny"), tmp_path / "ckpt")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_vision(path)


@pytest.mark.parametrize("dialect", ["transformers", "original"])
@pytest.mark.parametrize("ep", [2, 4])
def test_expert_subset_is_one_over_ep(checkpoints, dialect: str, ep: int) -> None:
    path = checkpoints("tiny", dialect)
    full = load_language_model(path)
    n = full.cfg.n_routed_experts
    per_rank = n // ep
    for rank in range(ep):
        part = load_language_model(path, expert_range=(rank * per_rank, per_rank))
        assert routed_expert_bytes(part) * ep == routed_expert_bytes(full)
        layer = full.layers[-1].mlp.experts
        mine = part.layers[-1].mlp.experts
        torch.testing.assert_close(mine.gate_up_proj, layer.gate_up_proj[rank * per_rank:(rank + 1) * per_rank])
        torch.testing.assert_close(mine.down_proj, layer.down_proj[rank * per_rank:(rank + 1) * per_rank])


def test_rank_never_reads_other_ranks_experts(checkpoints, tmp_path: Path) -> None:
    """Delete every expert rank 0 does not own: rank 0 still loads, rank 1 reports what is missing."""
    path = _copy(checkpoints("tiny", "original"), tmp_path / "ckpt")
    n = load_model_config(path).text.n_routed_experts
    def expert_of(name: str) -> int:
        return int(name.split(".mlp.experts.")[1].split(".")[0]) if ".mlp.experts." in name else -1

    _edit_weights(path, lambda t: [t.pop(k) for k in list(t) if expert_of(k) >= n // 2])
    load_language_model(path, expert_range=(0, n // 2))
    with pytest.raises(MissingTensorError, match=f"experts.{n // 2}."):
        load_language_model(path, expert_range=(n // 2, n // 2))


def test_sharded_equals_single_file(checkpoints) -> None:
    single, sharded = checkpoints("odd"), checkpoints("odd", shards=3)
    assert (sharded / "model.safetensors.index.json").exists()
    for load in (load_vision, load_language_model):
        a, b = _state(load(single)), _state(load(sharded))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_config_and_weight_dialects(checkpoints) -> None:
    plain = checkpoints("tiny", "transformers")
    mixed = checkpoints("tiny", "transformers", config_dialect="original")
    assert load_model_config(mixed).dialect == "original"
    assert load_model_config(plain).text == load_model_config(mixed).text
    a, b = _state(load_language_model(plain)), _state(load_language_model(mixed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_both_dialects_give_the_same_parameters(checkpoints) -> None:
    for load in (load_vision, load_language_model):
        a = _state(load(checkpoints("odd", "transformers")))
        b = _state(load(checkpoints("odd", "original")))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_checkpoint(checkpoints) -> None:
    fp32 = _state(load_language_model(checkpoints("tiny")))
    bf16 = load_language_model(checkpoints("tiny", dtype="bfloat16"), dtype=torch.bfloat16)
    state = bf16.state_dict()
    assert state["embed_tokens.weight"].dtype == torch.bfloat16
    assert state["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # kept in fp32
    assert torch.equal(state["embed_tokens.weight"], fp32["embed_tokens.weight"].to(torch.bfloat16))
