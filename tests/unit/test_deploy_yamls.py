"""The shipped deploy YAMLs are valid Serve configs whose args our app accepts."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from runtime.config import AppConfig
from runtime.router.launch import DEFAULT_CONFIG

DEPLOYMENTS = {"Router", "LMService", "VisionService"}


@pytest.mark.parametrize("name", ["local.yaml", "cluster.yaml", "multinode.yaml"])
def test_yaml_is_a_valid_deploy_config(name) -> None:
    raw = yaml.safe_load((DEFAULT_CONFIG.parent / name).read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "runtime.router.app:build_app"
    assert {d.name for d in app.deployments} == DEPLOYMENTS
    args = dict(app.args)
    args["model"] = "tiny"  # the cluster example names a path that exists only on a cluster
    AppConfig.model_validate(args)


def test_cluster_example_autoscales_both_pools() -> None:
    raw = yaml.safe_load((DEFAULT_CONFIG.parent / "cluster.yaml").read_text())
    deployments = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    assert all("autoscaling_config" in deployments[n] for n in ("LMService", "VisionService"))


def test_multinode_example_places_each_pool_by_its_resource() -> None:
    raw = yaml.safe_load((DEFAULT_CONFIG.parent / "multinode.yaml").read_text())
    config = AppConfig.model_validate(raw["applications"][0]["args"])
    assert config.router_options()["ray_actor_options"]["resources"] == {"lm_host": 0.01}
    assert config.lm_options()["ray_actor_options"]["resources"] == {"lm_host": 0.01}
    assert config.vision_options()["ray_actor_options"]["resources"] == {"vision_host": 0.01}
    assert all("ray_actor_options" not in d for d in raw["applications"][0]["deployments"])
