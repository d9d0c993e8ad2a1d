"""A running engine's weights: read them (whole, or one expert range), check a new checkpoint has
the served shape, drop them to free memory, read them again. The engine calls these between steps
(sleep, wake, weight updates); runtime.lm_service.loading uses the same reader to build an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtime.checkpoint.loader import load_language_model
from runtime.errors import UnsupportedConfigError
from runtime.models.config import ModelConfig, load_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM

if TYPE_CHECKING:
    from runtime.lm_service.expert_parallel import ExpertGroup

LocalLoader = Callable[[tuple[int, int] | None], DeepseekV3LM]  # expert range (None: all) -> this rank's LM


def local_loader(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str,
                 read: Callable[..., DeepseekV3LM] = load_language_model) -> LocalLoader:
    """Reads this process's part of the LM: every expert, or the range an expert-parallel rank owns."""
    def load(experts: tuple[int, int] | None) -> DeepseekV3LM:
        return read(model_dir, cfg, dtype, device, expert_range=experts)

    return load


def check_same_shape(model_dir: str | Path, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose language model has another shape than the one served."""
    new = load_model_config(model_dir).text
    for name in new.__dataclass_fields__:
        if getattr(new, name) != getattr(cfg.text, name):
            raise UnsupportedConfigError(f"{model_dir} is another model: its text_config.{name} is "
                                         f"{getattr(new, name)!r}, the served model's is {getattr(cfg.text, name)!r}")


def reload_language_model(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str,
                          group: ExpertGroup | None) -> DeepseekV3LM:
    """New weights for a running engine, from a checkpoint of the same shape, read and checked in full
    (every tensor present, of its shape and kind) before they replace anything: a CheckpointError
    leaves the old weights serving. With expert parallelism each rank reads only its experts."""
    check_same_shape(model_dir, cfg)
    load_local = local_loader(model_dir, cfg, dtype, device)
    if group is None:
        return load_local(None)
    return group.reload(str(model_dir), load_local, cfg.text.n_routed_experts)


def drop_weights(lm: DeepseekV3LM, group: ExpertGroup | None) -> None:
    """Free the weights' memory (the module stays, on the meta device); reload_language_model brings them back."""
    lm.to("meta")
    if group is not None:
        group.drop()
