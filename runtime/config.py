"""The one typed config of a deployed app, built from the YAML `args` and validated at deploy time.

Replica counts and autoscaling are not here: they are Serve's per-deployment settings
(`deployments: - name: LMService / VisionService` in the YAML), so that changing them is a
lightweight update of that pool alone. Everything else a user tunes is here, with a clear message
when it is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.checkpoint.tokenizer_loader import check_tokenizer_code
from runtime.lm_service.engine import EngineConfig
from runtime.lm_service.vision_client import VisionClientConfig
from runtime.logs import LogLevel
from runtime.requests import RequestLimits
from runtime.vision_service.encoder import VisionConfig
from runtime.vision_service.preprocess import ImageLimits

MiB = 2**20
TINY = "tiny"  # the embedded default: built from the project's own preset on first start


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineArgs(_Section):
    kv_cache_mb: int = Field(256, ge=1, description="paged latent KV cache per LM replica")
    block_size: int = Field(16, ge=1, le=1024)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(1024, ge=16)
    max_prefill_tokens_while_decoding: int | None = Field(
        256, ge=1, description="prompt tokens a step may take while it also decodes (null: the whole budget); "
                               "lower: shorter inter-token gaps when requests arrive, longer TTFT for long prompts")
    prefix_caching: bool = True
    kv_fp8: bool = False
    ep_size: int = Field(1, ge=1, description="expert-parallel ranks per LM replica")
    ep_timeout_s: float = Field(120.0, gt=0)
    threads_per_rank: int = Field(1, ge=1, description="torch threads of each rank")
    stream_interval_ms: float = Field(10.0, ge=0, description="merge streamed tokens after the first over this")
    engine_process: bool | None = Field(
        None, description="step the engine in a process of its own, apart from the replica's event loop "
                          "(default: yes when ep_size is 1; with expert parallelism the replica is rank 0)")
    cpus_per_rank: float = Field(1.0, ge=0, description="Ray CPUs reserved for each rank (rank 0 = the replica)")
    gpus_per_rank: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _engine_process_needs_one_rank(self) -> EngineArgs:
        if self.engine_process and self.ep_size > 1:
            raise ValueError("engine_process needs ep_size 1 (with expert parallelism the replica is rank 0)")
        return self

    @property
    def separate_process(self) -> bool:
        return self.ep_size == 1 if self.engine_process is None else self.engine_process


class VisionArgs(_Section):
    cache_mb: float = Field(256, gt=0, description="embedding cache per vision replica")
    lease_s: float = Field(600.0, gt=0, description="a reference whose release never comes expires after this")
    max_batch: int = Field(16, ge=1)
    max_wait_s: float = Field(0.005, ge=0)
    max_pixels: int = Field(40_000_000, ge=1)
    cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved for each vision replica")
    gpus: float = Field(0.0, ge=0)
    encode_timeout_s: float = Field(120.0, gt=0)
    arrival_timeout_s: float = Field(30.0, gt=0)


class LimitArgs(_Section):
    max_images: int = Field(16, ge=0)
    max_image_mb: float = Field(20.0, gt=0)
    max_stop_strings: int = Field(16, ge=0)
    max_body_mb: float = Field(64.0, gt=0)
    max_queued_requests: int = Field(256, ge=1, description="per router replica; beyond it: 429 + Retry-After")
    request_timeout_s: float = Field(600.0, gt=0)


class ImageUrlArgs(_Section):
    allow_http: bool = False
    allow_private_addresses: bool = False
    fetch_timeout_s: float = Field(10.0, gt=0)


class AdminArgs(_Section):
    enabled: bool = Field(False, description="the /admin/* endpoints (abort, sleep, wake, update_weights); they "
                                             "need api_key, and answer 404 while off")
    timeout_s: float = Field(600.0, gt=0, description="the longest an admin call waits for every LM replica "
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


class AppConfig(_Section):
    model: str = Field(TINY, description="checkpoint directory, or 'tiny' for the embedded default")
    trust_remote_code: bool = Field(False, description="let the checkpoint's own Python code run: a tokenizer "
                                                       "class named by its tokenizer_config.json auto_map")
    served_model_name: list[str] | None = Field(
        None, description="the names clients use for the model (default: `model` as given, and its folder's name)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    cache_dir: str = "~/.cache/kimi-runtime"
    host: str | None = Field(None, description="address the ZMQ sockets bind (default: the node's IP)")
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

    def engine_config(self) -> dict[str, Any]:
        e = self.engine
        config = EngineConfig(dtype=self.dtype, device=self.device, block_size=e.block_size,
                              kv_cache_bytes=e.kv_cache_mb * MiB, kv_fp8=e.kv_fp8, max_num_seqs=e.max_num_seqs,
                              max_num_batched_tokens=e.max_num_batched_tokens,
                              max_prefill_tokens_while_decoding=e.max_prefill_tokens_while_decoding,
                              prefix_caching=e.prefix_caching,
                              ep_size=e.ep_size, ep_timeout_s=e.ep_timeout_s, threads_per_rank=e.threads_per_rank,
                              stream_interval_s=e.stream_interval_ms / 1e3, trust_remote_code=self.trust_remote_code)
        return config.__dict__.copy()

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

    def vision_config(self) -> dict[str, Any]:
        v = self.vision
        config = VisionConfig(dtype=self.dtype, device=self.device, cache_bytes=int(v.cache_mb * MiB),
                              lease_s=v.lease_s, max_batch=v.max_batch, max_wait_s=v.max_wait_s,
                              max_pixels=v.max_pixels)
        return config.__dict__.copy()

    def vision_client_config(self) -> dict[str, Any]:
        return VisionClientConfig(self.vision.encode_timeout_s, self.vision.arrival_timeout_s).__dict__.copy()

    def image_limits(self) -> ImageLimits:
        """The decoder's limits: the router checks image headers against the same ones."""
        return ImageLimits(max_pixels=self.vision.max_pixels)

    def request_limits(self) -> RequestLimits:
        lim = self.limits
        return RequestLimits(max_images=lim.max_images, max_image_bytes=int(lim.max_image_mb * MiB),
                             max_stop_strings=lim.max_stop_strings, allow_http_images=self.image_urls.allow_http)


def _actor_options(cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if resources:
        options["resources"] = dict(resources)
    return {"ray_actor_options": options}
