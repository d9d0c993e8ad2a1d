"""The Serve application: `import_path: runtime.router.app:build_app` in a YAML, or `serve run`.

    Router (HTTP ingress) ──handle──▶ LMService (one engine per replica) ──handle──▶ VisionService

The YAML's `args` are validated into AppConfig here, at deploy time. Replica counts and
autoscaling are per deployment in the YAML's `deployments:` list (names "Router", "LMService",
"VisionService"), so scaling one pool is a lightweight update that leaves the others running.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from runtime.config import AppConfig


def build_app(args: dict[str, Any]) -> Application:
    from runtime.lm_service.deployment import LMService
    from runtime.router.server import Router
    from runtime.vision_service.deployment import VisionService

    # serve.deployment returns Deployment objects that mypy sees as the decorated classes.
    config = AppConfig.model_validate(args or {})
    model_dir = str(config.resolve_model_dir())
    vision = VisionService.options(**config.vision_options()).bind(  # type: ignore[attr-defined]
        model_dir, config.vision_config(), config.host, proxy=config.zmq_proxy, log_level=config.log_level)
    lm = LMService.options(**config.lm_options()).bind(  # type: ignore[attr-defined]
        model_dir, config.engine_config(), vision, config.host, config.vision_client_config(),
        config.rank_resources(), config.engine.separate_process, proxy=config.zmq_proxy, log_level=config.log_level)
    return Router.options(**config.router_options()).bind(  # type: ignore[attr-defined]
        config.model_dump(), model_dir, lm, vision)
