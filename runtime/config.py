"""The one typed config of a deployed app, built from the YAML `args` and validated at deploy time.

Replica counts and autoscaling are not here: they are Serve's per-deployment settings
(`deployments: - name: LMService / VisionService` in the YAML), so that changing them is a
lightweight update of that pool alone. Everything else a user tunes is here, with a clear message
when it is wrong.

Each service's setting is declared once, in the typed config the service takes (runtime.settings,
runtime.requests); the `engine:`, `vision:` and `limits:` sections below are those declarations plus
what only the deployment needs (Ray resources, router limits). This module imports no service: the
router replica that builds it holds no tensors and imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from runtime.checkpoint.tokenizer_loader import check_tokenizer_code
from runtime.images import ImageLimits
from runtime.logs import LogLevel
from runtime.requests import ContentLimits, RequestLimits
from runtime.settings import (
    FORBID,
    Dtype,
    EngineConfig,
    EngineTunables,
    Hardware,
    VisionClientConfig,
    VisionConfig,
    VisionTunables,
    fields_of,
)

TINY = "tiny"  # the embedded default: built from the project's own preset on first start


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, config=FORBID)
class EngineArgs(EngineTunables):
    """YAML `engine:`: the engine's own settings, and how Ray places its ranks."""

    engine_process: bool | None = Field(
        default=None, description="step the engine in a process of its own, apart from the replica's event loop "
                          "(default: yes when ep_size is 1; with expert parallelism the replica is rank 0)")
    cpus_per_rank: float = Field(default=1.0, ge=0,
                                 description="Ray CPUs reserved for each rank (rank 0 = the replica)")
    gpus_per_rank: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _engine_process_needs_one_rank(self) -> EngineArgs:
        if self.engine_process and self.ep_size > 1:
            raise ValueError("engine_process needs ep_size 1 (with expert parallelism the replica is rank 0)")
        return self

    @property
    def separate_process(self) -> bool:
        return self.ep_size == 1 if self.engine_process is None else self.engine_process


@dataclass(frozen=True, config=FORBID)
class VisionArgs(VisionClientConfig, VisionTunables):
    """YAML `vision:`: the vision replica's settings, the LM replica's timeouts for it, and Ray's CPUs/GPUs."""

    cpus: float = Field(default=1.0, ge=0, description="Ray CPUs reserved for each vision replica")
    gpus: float = Field(default=0.0, ge=0)


@dataclass(frozen=True, config=FORBID)
class LimitArgs(ContentLimits):
    """YAML `limits:`: what one request may hold, and what the router admits."""

    max_body_mb: float = Field(default=64.0, gt=0)
    max_queued_requests: int = Field(default=256, ge=1, description="per router replica; beyond it: 429 + Retry-After")
    request_timeout_s: float = Field(default=600.0, gt=0)


class ImageUrlArgs(_Section):
    allow_http: bool = False
    allow_private_addresses: bool = False
    fetch_timeout_s: float = Field(default=10.0, gt=0)


class AdminArgs(_Section):
    enabled: bool = Field(default=False,
                          description="the /admin/* endpoints (abort, sleep, wake, update_weights); they "
                                      "need api_key, and answer 404 while off")
    timeout_s: float = Field(default=600.0, gt=0, description="the longest an admin call waits for every LM replica "
                                                      "(a drain waits for the requests in flight)")


Resources = dict[str, Annotated[float, Field(gt=0)]]


class PlacementArgs(_Section):
    """Custom Ray resources each replica of a pool asks for, so that a pool runs only on the nodes
    started with them (`ray start --resources '{"vision_host": 1}'`; deploy/multinode.yaml). They
    are added to the pool's own CPU/GPU options here, because a `ray_actor_options` in the YAML's
    `deployments:` list would replace those options as a whole."""

    router: Resources = Field(default_factory=dict)
    lm: Resources = Field(default_factory=dict, description="each LM replica (and each EP rank's bundle)")
    vision: Resources = Field(default_factory=dict)


_HARDWARE = Hardware()


class AppConfig(_Section):
    model: str = Field(default=TINY, description="checkpoint directory, or 'tiny' for the embedded default")
    trust_remote_code: bool = Field(default=False, description="let the checkpoint's own Python code run: a tokenizer "
                                                       "class named by its tokenizer_config.json auto_map")
    served_model_name: list[str] | None = Field(
        None, description="the names clients use for the model (default: `model` as given, and its folder's name)")
    dtype: Dtype = _HARDWARE.dtype
    device: str = _HARDWARE.device
    cache_dir: str = "~/.cache/kimi-runtime"
    host: str | None = Field(default=None, description="address the ZMQ sockets bind (default: the node's IP)")
    zmq_proxy: str | None = Field(
        None, pattern=r"^[^:\s]+:\d+$",
        description="host:port of a SOCKS5 proxy that every embedding and release push connects through "
                    "(a firewalled cluster; tests/multinode's slow, lossy wire)")
    api_key: str | None = None
    log_level: LogLevel = Field(
        "INFO", description="of the runtime's lines in every replica's log (INFO: a line per request admitted "
                            "and ended, replica starts, failures; DEBUG adds more; WARNING: failures only)")
    engine: EngineArgs = EngineArgs()
    vision: VisionArgs = VisionArgs()
    limits: LimitArgs = LimitArgs()
    image_urls: ImageUrlArgs = ImageUrlArgs()
    admin: AdminArgs = AdminArgs()
    placement: PlacementArgs = PlacementArgs()

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str) -> str:
        if v != TINY and not (Path(v).expanduser() / "config.json").is_file():
            raise ValueError(f"{v!r} is not a checkpoint directory (no config.json); use 'tiny' for the "
                             "embedded default")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("served_model_name")
    @classmethod
    def _names_not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not all(v)):
            raise ValueError("served_model_name must be a non-empty name or list of names")
        return v

    @property
    def served_names(self) -> list[str]:
        """The names /v1/models lists, the first one answering in every response (as vLLM does:
        `model` as given, a path for a directory, unless served_model_name replaces it)."""
        return list(self.served_model_name or [self.model])

    @model_validator(mode="after")
    def _admin_needs_a_key(self) -> AppConfig:
        if self.admin.enabled and not self.api_key:
            raise ValueError("admin.enabled needs api_key: the admin endpoints answer only requests that carry it")
        return self

    @model_validator(mode="after")
    def _model_code_is_trusted(self) -> AppConfig:
        """At deploy time, not in a replica: RemoteCodeRefusedError names this setting."""
        if self.model != TINY:
            check_tokenizer_code(Path(self.model).expanduser(), self.trust_remote_code)
        return self

    @property
    def name(self) -> str:
        return self.served_names[0]

    def serves(self, name: str) -> bool:
        """Whether a request's `model` names this model: a served name, or the folder's name when
        served_model_name is not set."""
        aliases = [] if self.served_model_name else [Path(self.model).name]
        return name in self.served_names or name in aliases

    def resolve_model_dir(self) -> Path:
        """The checkpoint directory; for 'tiny', built into cache_dir on first use (no download)."""
        if self.model != TINY:
            return Path(self.model).expanduser().resolve()
        from runtime.checkpoint.maker import make_checkpoint

        target = Path(self.cache_dir).expanduser() / "tiny"
        if not (target / "config.json").is_file():
            make_checkpoint(target, TINY, seed=0)
        return target.resolve()

    # --- what each service is given ----------------------------------------------------------

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**fields_of(EngineTunables, self.engine), dtype=self.dtype, device=self.device,
                            trust_remote_code=self.trust_remote_code)

    def rank_resources(self) -> dict[str, float]:
        return {"CPU": self.engine.cpus_per_rank, "GPU": self.engine.gpus_per_rank}

    def lm_options(self) -> dict[str, Any]:
        """Serve options of the LM deployment: one placement-group bundle per EP rank, packed on one
        node (bundle 0 is the replica itself)."""
        res = self.rank_resources()
        options = _actor_options(res["CPU"], res["GPU"], self.placement.lm)
        if self.engine.ep_size > 1:
            bundle = ({k: v for k, v in res.items() if v > 0} or {"CPU": 0.01}) | self.placement.lm
            options |= {"placement_group_bundles": [bundle] * self.engine.ep_size,
                        "placement_group_strategy": "STRICT_PACK"}
        return options

    def vision_options(self) -> dict[str, Any]:
        return _actor_options(self.vision.cpus, self.vision.gpus, self.placement.vision)

    def router_options(self) -> dict[str, Any]:
        """The router holds no model: it needs no CPU of its own, only its placement."""
        return _actor_options(0, 0, self.placement.router)

    def vision_config(self) -> VisionConfig:
        return VisionConfig(**fields_of(VisionTunables, self.vision), dtype=self.dtype, device=self.device)

    def vision_client_config(self) -> VisionClientConfig:
        return VisionClientConfig(**fields_of(VisionClientConfig, self.vision))

    def image_limits(self) -> ImageLimits:
        """The decoder's limits: the router checks image headers against the same ones."""
        return ImageLimits(**fields_of(ImageLimits, self.vision))

    def request_limits(self) -> RequestLimits:
        return RequestLimits(**fields_of(ContentLimits, self.limits), allow_http_images=self.image_urls.allow_http)


def _actor_options(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if resources:
        options["resources"] = dict(resources)
    return {"ray_actor_options": options}
