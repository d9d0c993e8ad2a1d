"""The app config: defaults, what each service gets, and clear errors for bad YAML args."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from runtime.config import AppConfig
from runtime.errors import RemoteCodeRefusedError
from runtime.settings import EngineConfig, VisionConfig


def test_defaults_build_valid_service_configs() -> None:
    config = AppConfig()
    assert config.name == "tiny"
    assert isinstance(config.engine_config(), EngineConfig) and isinstance(config.vision_config(), VisionConfig)
    assert config.engine_config().kv_cache_bytes == 256 * 2**20
    assert config.vision_config().cache_bytes == 256 * 2**20
    assert "placement_group_bundles" not in config.lm_options()


def test_ep_size_reserves_one_packed_bundle_per_rank() -> None:
    config = AppConfig.model_validate({"engine": {"ep_size": 3, "cpus_per_rank": 0.5}})
    options = config.lm_options()
    assert options["placement_group_bundles"] == [{"CPU": 0.5}] * 3
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_cpus"] == 0.5


def test_placement_resources_join_each_pools_own_options() -> None:
    config = AppConfig.model_validate({"engine": {"ep_size": 2, "cpus_per_rank": 0.5}, "vision": {"cpus": 0.25},
                                       "placement": {"router": {"lm_host": 0.01}, "lm": {"lm_host": 0.01},
                                                     "vision": {"vision_host": 0.01}}})
    assert config.router_options() == {"ray_actor_options": {"num_cpus": 0, "num_gpus": 0,
                                                             "resources": {"lm_host": 0.01}}}
    lm = config.lm_options()
    assert lm["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"lm_host": 0.01}}
    assert lm["placement_group_bundles"] == [{"CPU": 0.5, "lm_host": 0.01}] * 2
    assert config.vision_options()["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0,
                                                            "resources": {"vision_host": 0.01}}
    assert "resources" not in AppConfig().vision_options()["ray_actor_options"]


@pytest.mark.parametrize("args,where", [
    ({"placement": {"vision": {"vision_host": 0}}}, "vision_host"),
    ({"model": "/no/such/dir"}, "model"),
    ({"dtype": "float8"}, "dtype"),
    ({"engine": {"ep_size": 0}}, "ep_size"),
    ({"engine": {"kv_cache_gb": 1}}, "kv_cache_gb"),
    ({"vision": {"lease_s": -1}}, "lease_s"),
    ({"unknown": 1}, "unknown"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"log_level": 10}, "log_level"),
])
def test_bad_args_name_the_field(args, where) -> None:
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    assert where in str(e.value)


def test_log_level_defaults_to_info_and_takes_any_case() -> None:
    assert AppConfig().log_level == "INFO"
    assert AppConfig.model_validate({"log_level": "debug"}).log_level == "DEBUG"


def test_tiny_is_built_into_the_cache_dir_once(tmp_path) -> None:
    config = AppConfig(cache_dir=str(tmp_path))
    path = config.resolve_model_dir()
    assert (path / "config.json").is_file() and path == (tmp_path / "tiny").resolve()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert config.resolve_model_dir() == path and (path / "config.json").stat().st_mtime_ns == stamp


def test_the_engine_steps_in_its_own_process_unless_expert_parallel() -> None:
    assert AppConfig.model_validate({}).engine.separate_process
    assert not AppConfig.model_validate({"engine": {"ep_size": 2}}).engine.separate_process
    assert not AppConfig.model_validate({"engine": {"engine_process": False}}).engine.separate_process
    with pytest.raises(ValidationError, match="engine_process needs ep_size 1"):
        AppConfig.model_validate({"engine": {"ep_size": 2, "engine_process": True}})


def test_model_is_named_as_given_its_folder_too_unless_served_names_replace_them(tmp_path) -> None:
    ckpt = tmp_path / "my-ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    by_path = AppConfig.model_validate({"model": str(ckpt)})
    assert by_path.name == str(ckpt) and by_path.served_names == [str(ckpt)]
    assert by_path.serves(str(ckpt)) and by_path.serves("my-ckpt") and not by_path.serves("other")
    named = AppConfig.model_validate({"model": str(ckpt), "served_model_name": ["kimi", "k2"]})
    assert named.name == "kimi" and named.served_names == ["kimi", "k2"]
    assert named.serves("k2") and not named.serves(str(ckpt)) and not named.serves("my-ckpt")
    assert AppConfig.model_validate({"served_model_name": "one"}).served_names == ["one"]
    for bad in ([], [""], ""):
        with pytest.raises(ValidationError, match="served_model_name"):
            AppConfig.model_validate({"served_model_name": bad})


def test_checkpoint_code_needs_trust_remote_code(checkpoints) -> None:
    path = str(checkpoints("tiny", tokenizer="tiktoken"))
    with pytest.raises(RemoteCodeRefusedError, match="trust_remote_code: true"):
        AppConfig.model_validate({"model": path})
    config = AppConfig.model_validate({"model": path, "trust_remote_code": True})
    assert config.engine_config().trust_remote_code
    assert not AppConfig().engine_config().trust_remote_code


def test_admin_is_off_by_default_and_needs_the_api_key() -> None:
    assert AppConfig().admin.enabled is False
    with pytest.raises(ValidationError, match="admin.enabled needs api_key"):
        AppConfig.model_validate({"admin": {"enabled": True}})
    assert AppConfig.model_validate({"admin": {"enabled": True}, "api_key": "k"}).admin.enabled
