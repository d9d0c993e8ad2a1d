"""Build an engine from a checkpoint directory: the LM (with its expert-parallel group when
ep_size > 1), the tokenizer and the EOS ids from generation_config, put together as an Engine.

The engine never loads a checkpoint itself at construction: this module depends on it, not the
other way round (what it does with weights later, it asks runtime.lm_service.weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.checkpoint.loader import load_language_model
from runtime.checkpoint.tokenizer_loader import load_tokenizer
from runtime.lm_service.allocator import keep_freed_memory
from runtime.lm_service.engine import Engine, EngineHooks
from runtime.lm_service.expert_parallel import ExpertGroup, RankLauncher, spawn_process
from runtime.lm_service.weights import local_loader
from runtime.models.config import ModelConfig, load_model_config
from runtime.models.deepseek_v3 import DeepseekV3LM
from runtime.prompt import GenerationDefaults
from runtime.settings import EngineConfig


@dataclass
class EngineParts:
    model_config: ModelConfig
    lm: DeepseekV3LM
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    expert_group: ExpertGroup | None


def build_engine(model_dir: str | Path, config: EngineConfig = EngineConfig(), hooks: EngineHooks | None = None,
                 launch: RankLauncher | None = None) -> Engine:
    """The engine of one replica, serving this checkpoint. `launch` starts the expert-parallel
    worker ranks (default: local child processes)."""
    keep_freed_memory()
    parts = load_engine_parts(model_dir, config, launch)
    engine = Engine(parts.lm, parts.model_config, config, parts.eos_token_ids, parts.tokenizer, hooks,
                    parts.expert_group)
    engine.weights_path = str(model_dir)
    return engine


def load_engine_parts(model_dir: str | Path, config: EngineConfig,
                      launch: RankLauncher | None = None) -> EngineParts:
    """`launch` starts the expert-parallel worker ranks (default: child processes of this one)."""
    cfg = load_model_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)  # first: a refusal costs no weight loading
    # load_language_model is looked up here, at call time, so a test can replace it in this module
    load_local = local_loader(model_dir, cfg, config.torch_dtype, config.device, load_language_model)
    group = None
    if config.ep_size > 1:
        lm, group = ExpertGroup.start(str(model_dir), config.ep_size, config.dtype, config.device,
                                      config.ep_timeout_s, config.threads_per_rank, load_local,
                                      cfg.text.n_routed_experts, launch=launch or spawn_process)
    else:
        lm = load_local(None)
    eos = GenerationDefaults.load(model_dir, cfg).eos_token_ids
    return EngineParts(cfg, lm, tokenizer, eos, group)
