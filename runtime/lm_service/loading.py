"""Build an engine's parts from a checkpoint directory: the LM (with its expert-parallel group
when ep_size > 1), the tokenizer and the EOS ids from generation_config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.checkpoint.loader import load_language_model
from runtime.checkpoint.tokenizer_loader import load_tokenizer
from runtime.errors import UnsupportedConfigError
from runtime.lm_service.expert_parallel import ExpertGroup, RankLauncher, spawn_process
from runtime.models.config import ModelConfig, load_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM
from runtime.prompt import GenerationDefaults

if TYPE_CHECKING:
    from runtime.settings import EngineConfig


@dataclass
class EngineParts:
    model_config: ModelConfig
    lm: DeepseekV3LM
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    expert_group: ExpertGroup | None


def load_engine_parts(model_dir: str | Path, config: EngineConfig,
                      launch: RankLauncher | None = None) -> EngineParts:
    """`launch` starts the expert-parallel worker ranks (default: child processes of this one)."""
    cfg = load_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)  # first: a refusal costs no weight loading

    def load_local(experts: tuple[int, int] | None) -> DeepseekV3LM:
        return load_language_model(model_dir, cfg, config.torch_dtype, config.device, expert_range=experts)

    group = None
    if config.ep_size > 1:
        lm, group = ExpertGroup.start(str(model_dir), config.ep_size, config.dtype, config.device,
                                      config.ep_timeout_s, config.threads_per_rank, load_local,
                                      cfg.text.n_routed_experts, launch=launch or spawn_process)
    else:
        lm = load_local(None)
    eos = GenerationDefaults.load(model_dir, cfg).eos_token_ids
    return EngineParts(cfg, lm, tokenizer, eos, group)


def check_same_shape(model_dir: str | Path, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose language model has another shape than the one served."""
    new = load_model_config(model_dir).text
    for name in new.__dataclass_fields__:
        if getattr(new, name) != getattr(cfg.text, name):
            raise UnsupportedConfigError(f"{model_dir} is another model: its text_config.{name} is "
                                         f"{getattr(new, name)!r}, the served model's is {getattr(cfg.text, name)!r}")


def reload_language_model(model_dir: str | Path, cfg: ModelConfig, config: EngineConfig,
                          group: ExpertGroup | None) -> DeepseekV3LM:
    """New weights for a running engine, from a checkpoint of the same shape, read and checked in full
    (every tensor present, of its shape and kind) before they replace anything: a CheckpointError
    leaves the old weights serving. With expert parallelism each rank reads only its experts."""
    check_same_shape(model_dir, cfg)

    def load_local(experts: tuple[int, int] | None) -> DeepseekV3LM:
        return load_language_model(model_dir, cfg, config.torch_dtype, config.device, expert_range=experts)

    if group is None:
        return load_local(None)
    return group.reload(str(model_dir), load_local, cfg.text.n_routed_experts)


def drop_weights(lm: DeepseekV3LM, group: ExpertGroup | None) -> None:
    """Free the weights' memory (the module stays, on the meta device); reload_language_model brings them back."""
    lm.to("meta")
    if group is not None:
        group.drop()
