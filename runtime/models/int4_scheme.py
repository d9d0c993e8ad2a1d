"""The `quantization_config` that declares INT4 weights (compressed-tensors' pack-quantized format,
runtime/models/int4.py has the numbers). No torch: the router reads config.json through this."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from runtime.errors import UnsupportedQuantizationError

PER_WORD = 8  # 4-bit values in one int32

# The release's ignore list: attention, shared experts and dense MLPs stay unquantized (`re:` entries
# are regexes matched at the start of a module name); routed experts `mlp.experts.E.*_proj` are not.
RELEASE_IGNORE = ("lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*")


# --- the config that declares them -------------------------------------------------------------


@dataclass(frozen=True)
class Int4Scheme:
    """config.json's quantization_config, once checked: symmetric INT4 weights with one scale per
    `group_size` input columns, for the Linear modules `targets` names minus `ignore`."""

    group_size: int
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = RELEASE_IGNORE

    def covers(self, module: str) -> bool:
        """Would compressed-tensors quantize this Linear module (named as in the checkpoint)?"""
        targeted = any(t == "Linear" or _match(module, t) for t in self.targets)
        return targeted and not any(_match(module, i) for i in self.ignore)

    def to_json(self) -> dict[str, Any]:
        """quantization_config as the Kimi-K2.5 release writes it (compressed-tensors' own keys)."""
        weights = {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": self.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
        }
        group = {"targets": list(self.targets), "weights": weights, "input_activations": None,
                 "output_activations": None}
        return {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": list(self.ignore), "kv_cache_scheme": None,
        }


def _match(module: str, entry: str) -> bool:
    """compressed-tensors' name rule: `re:` entries are re.match (anchored at the start), others exact."""
    return re.match(entry[3:], module) is not None if entry.startswith("re:") else entry == module


def parse_quantization_config(raw: dict[str, Any]) -> Int4Scheme | None:
    """The scheme config.json declares (at the top level, inside text_config, or both), or None.
    Anything but compressed-tensors' packed symmetric group-wise INT4 weights is refused, naming
    the key, because loading it as that would compute with garbage weights."""
    top = raw.get("quantization_config")
    inner = (raw.get("text_config") or {}).get("quantization_config")
    if top and inner and top != inner:
        raise UnsupportedQuantizationError("quantization_config and text_config.quantization_config differ")
    quant = top or inner
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise UnsupportedQuantizationError(f"quantization_config is {type(quant).__name__}, not an object")
    _require_values(quant, "quantization_config", {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    })
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        if quant.get(key):
            raise UnsupportedQuantizationError(f"quantization_config.{key} is set; this runtime reads weights only")
    name, group = _only_group(quant.get("config_groups"))
    where = f"quantization_config.config_groups.{name}"
    return Int4Scheme(
        group_size=_weights_group_size(group.get("weights"), f"{where}.weights"),
        targets=_strings(group.get("targets"), f"{where}.targets"),
        ignore=_strings(quant.get("ignore") or [], "quantization_config.ignore"),
    )


def _require_values(d: dict[str, Any], where: str, expected: dict[str, Any]) -> None:
    for key, want in expected.items():
        if d.get(key) != want:
            raise UnsupportedQuantizationError(f"{where}.{key} is {d.get(key)!r}; this runtime reads only {want!r}")


def _only_group(groups: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(groups, dict) or len(groups) != 1:
        count = len(groups) if isinstance(groups, dict) else "no"
        raise UnsupportedQuantizationError(f"quantization_config.config_groups has {count} groups; expected one")
    name, group = next(iter(groups.items()))
    if not isinstance(group, dict):
        raise UnsupportedQuantizationError(
            f"quantization_config.config_groups.{name} names a preset scheme; spell out its weights"
        )
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise UnsupportedQuantizationError(
                f"quantization_config.config_groups.{name}.{key} is set; only weights may be quantized"
            )
    if group.get("format") not in (None, "pack-quantized"):
        raise UnsupportedQuantizationError(
            f"quantization_config.config_groups.{name}.format is {group['format']!r}; expected 'pack-quantized'"
        )
    return name, group


def _weights_group_size(weights: Any, where: str) -> int:
    if not isinstance(weights, dict):
        raise UnsupportedQuantizationError(f"{where} is missing")
    _require_values(weights, where, {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"})
    for key in ("dynamic", "actorder", "block_structure"):
        if weights.get(key):
            raise UnsupportedQuantizationError(f"{where}.{key} is {weights[key]!r}; this runtime reads only null")
    size = weights.get("group_size")
    if not isinstance(size, int) or size <= 0 or size % PER_WORD:
        raise UnsupportedQuantizationError(f"{where}.group_size is {size!r}; expected a positive multiple of 8")
    return size


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UnsupportedQuantizationError(f"{where} must be a list of strings, got {value!r}")
    for entry in value:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise UnsupportedQuantizationError(f"{where} entry {entry!r} is not a valid regex: {e}") from e
    return tuple(value)
