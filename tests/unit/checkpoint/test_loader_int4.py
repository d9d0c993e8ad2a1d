"""Loading INT4 (compressed-tensors pack-quantized) checkpoints: experts stay packed, compute equals
the dequantized float32 twin, expert-parallel ranks read only their own, and every broken
checkpoint is refused with a typed error that names the tensor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint.loader import load_language_model, load_routed_experts, routed_expert_bytes
from runtime.errors import QuantizedTensorError, UnsupportedConfigError, UnsupportedQuantizationError
from runtime.models.config import load_model_config
from runtime.models.experts import Int4RoutedExperts, RoutedExperts
from tests.latent_kv import ContiguousLatentKV, SequenceBatch

EXPERT = "language_model.model.layers.1.mlp.experts.3"  # original dialect, tiny preset


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _edit_config(path: Path, edit: Callable[[dict], object]) -> None:
    raw = json.loads((path / "config.json").read_text())
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    kv = ContiguousLatentKV(lm.cfg, 64, torch.float32)
    with torch.no_grad():
        return lm.logits(lm(lm.embed(ids), SequenceBatch([len(ids)], [kv])))


@pytest.mark.parametrize("dialect", ["transformers", "original"])
@pytest.mark.parametrize("preset", ["tiny", "odd"])
def test_int4_model_computes_exactly_what_its_float_twin_does(int4_checkpoints, preset: str, dialect: str) -> None:
    int4, twin = int4_checkpoints(preset, dialect)
    quantized, dense = load_language_model(int4), load_language_model(twin)
    assert all(isinstance(layer.mlp.experts, Int4RoutedExperts) for layer in quantized.layers[-1:])
    assert all(isinstance(layer.mlp.experts, RoutedExperts) for layer in dense.layers[-1:])
    ids = torch.randint(0, 500, (20,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(quantized, ids), _logits(dense, ids))


@pytest.mark.parametrize("preset", ["tiny", "mla576"])
def test_resident_expert_bytes_are_under_three_tenths_of_bf16(int4_checkpoints, preset: str) -> None:
    int4, twin = int4_checkpoints(preset, "original")
    packed = routed_expert_bytes(load_language_model(int4))
    bf16 = routed_expert_bytes(load_language_model(twin, dtype=torch.bfloat16))
    assert packed <= 0.3 * bf16, f"{packed} bytes packed vs {bf16} in bf16"
    assert routed_expert_bytes(load_language_model(int4, dtype=torch.bfloat16)) == packed  # scales stay bf16


@pytest.mark.parametrize("dialect", ["transformers", "original"])
def test_expert_parallel_ranks_hold_their_packed_slice(int4_checkpoints, dialect: str) -> None:
    int4, _ = int4_checkpoints("odd", dialect)  # 12 experts, group size 16
    cfg = load_model_config(int4)
    full = load_language_model(int4).layers[-1].mlp.experts
    total = routed_expert_bytes(load_language_model(int4))
    for first, count in ((0, 6), (6, 6)):
        assert routed_expert_bytes(load_language_model(int4, expert_range=(first, count))) * 2 == total
        mine = load_routed_experts(int4, cfg, (first, count))[cfg.text.num_hidden_layers - 1]
        assert isinstance(mine, Int4RoutedExperts) and isinstance(full, Int4RoutedExperts)
        for proj in ("gate_up_proj", "down_proj"):
            for held, whole in zip(mine.packed(proj), full.packed(proj), strict=True):
                assert torch.equal(held, whole[first : first + count])


def test_rank_never_reads_other_ranks_packed_experts(int4_checkpoints, tmp_path: Path) -> None:
    path = _copy(int4_checkpoints("tiny", "original")[0], tmp_path / "ckpt")
    n = load_model_config(path).text.n_routed_experts

    def expert_of(name: str) -> int:
        return int(name.split(".mlp.experts.")[1].split(".")[0]) if ".mlp.experts." in name else -1

    _edit_weights(path, lambda t: [t.pop(k) for k in list(t) if expert_of(k) >= n // 2])
    load_language_model(path, expert_range=(0, n // 2))
    with pytest.raises(QuantizedTensorError, match=rf"experts\.{n // 2}\.gate_proj\.weight_packed.*missing"):
        load_language_model(path, expert_range=(n // 2, n // 2))


def test_quantization_config_over_float_experts_loads_them_as_float(checkpoints, int4_checkpoints,
                                                                    tmp_path: Path) -> None:
    """The release's config covers the vision tower, stored unquantized: only packed tensors are INT4."""
    path = _copy(checkpoints("tiny", "original"), tmp_path / "ckpt")
    quant = json.loads((int4_checkpoints("tiny", "original")[0] / "config.json").read_text())["quantization_config"]
    _edit_config(path, lambda raw: raw.update(quantization_config=quant))
    assert load_model_config(path).int4 is not None
    lm = load_language_model(path)
    assert isinstance(lm.layers[-1].mlp.experts, RoutedExperts)


# --- broken checkpoints ------------------------------------------------------------------------


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], object]:
    return lambda t: t.pop(name)


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], object]:
    return lambda t: t.__setitem__(name, value(t[name]))


BROKEN_WEIGHTS = {
    "missing scale": (_drop(f"{EXPERT}.up_proj.weight_scale"), f"{EXPERT}.up_proj.weight_scale", "missing"),
    "missing shape": (_drop(f"{EXPERT}.down_proj.weight_shape"), f"{EXPERT}.down_proj.weight_shape", "missing"),
    "packed disagrees with shape": (_set(f"{EXPERT}.gate_proj.weight_packed", lambda p: p[:, :-1].contiguous()),
                                    f"{EXPERT}.gate_proj.weight_packed", "weight_shape"),
    "shape disagrees with the model": (_set(f"{EXPERT}.down_proj.weight_shape", lambda s: s * 2),
                                       f"{EXPERT}.down_proj.weight_shape", "the model needs"),
    "scale of another dtype": (_set(f"{EXPERT}.up_proj.weight_scale", lambda s: s.half()),
                               f"{EXPERT}.up_proj.weight_scale", "other scales"),
    "scale of the wrong shape": (_set(f"{EXPERT}.up_proj.weight_scale", lambda s: s[:, :1].contiguous()),
                                 f"{EXPERT}.up_proj.weight_scale", r"\[32, 1\]"),
    "packed weight as float": (_set(f"{EXPERT}.gate_proj.weight_packed", lambda p: p.float()),
                               f"{EXPERT}.gate_proj.weight_packed", "float32"),
    "packed attention": (lambda t: t.__setitem__("language_model.model.layers.0.self_attn.o_proj.weight_packed",
                                                 torch.zeros(64, 8, dtype=torch.int32)),
                         "language_model.model.layers.0.self_attn.o_proj.weight_packed", "only routed experts"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_WEIGHTS))
def test_broken_packed_tensors_name_the_tensor(int4_checkpoints, tmp_path: Path, case: str) -> None:
    edit, tensor, problem = BROKEN_WEIGHTS[case]
    path = _copy(int4_checkpoints("tiny", "original")[0], tmp_path / "ckpt")
    _edit_weights(path, edit)
    with pytest.raises(QuantizedTensorError, match=rf"'{tensor}'.*{problem}"):
        load_language_model(path)


def test_broken_packed_tensors_stop_an_expert_parallel_rank_too(int4_checkpoints, tmp_path: Path) -> None:
    path = _copy(int4_checkpoints("tiny", "original")[0], tmp_path / "ckpt")
    _edit_weights(path, _drop(f"{EXPERT}.up_proj.weight_scale"))
    with pytest.raises(QuantizedTensorError, match="up_proj.weight_scale"):
        load_routed_experts(path, load_model_config(path), (2, 4))


def _ignore_experts(raw: dict) -> None:
    for quant in (raw["quantization_config"], raw["text_config"]["quantization_config"]):
        quant["ignore"].append("re:.*experts.*")


def _group_size(size: int) -> Callable[[dict], object]:
    def edit(raw: dict) -> None:
        for quant in (raw["quantization_config"], raw["text_config"]["quantization_config"]):
            quant["config_groups"]["group_0"]["weights"]["group_size"] = size

    return edit


@pytest.mark.parametrize(("edit", "error", "named"), [
    (lambda raw: [raw.pop("quantization_config"), raw["text_config"].pop("quantization_config")],
     QuantizedTensorError, "no quantization_config"),
    (_ignore_experts, QuantizedTensorError, "ignores its module"),
    (_group_size(16), QuantizedTensorError, r"weight_scale.*\[32, 2\].*\[32, 4\]"),
    (_group_size(12), UnsupportedQuantizationError, "group_size"),
    (lambda raw: raw["quantization_config"].update(format="int-quantized"), UnsupportedQuantizationError, "differ"),
    (lambda raw: [q.update(format="marlin-24") for q in (raw["quantization_config"],
                                                          raw["text_config"]["quantization_config"])],
     UnsupportedQuantizationError, "format"),
])
def test_config_that_disagrees_with_the_tensors_is_refused(int4_checkpoints, tmp_path: Path, edit, error,
                                                           named: str) -> None:
    path = _copy(int4_checkpoints("tiny", "original")[0], tmp_path / "ckpt")
    _edit_config(path, edit)
    with pytest.raises(error, match=named):
        load_language_model(path)


def test_unsupported_quantization_is_an_unsupported_config() -> None:
    assert issubclass(UnsupportedQuantizationError, UnsupportedConfigError)
