"""The typed settings of each service, each declared once, with its default and its bounds.

No torch here: the router and the deploy-time config (runtime.config) import these, and neither
holds a tensor. Each is a frozen pydantic dataclass, so it is validated wherever it is built (a test,
the CLI, a replica) and the deploy YAML's sections are made of the same declarations: a YAML section
(runtime.config) is the service's tunable part plus its Ray placement, and a bad value fails at
deploy time with the YAML key in the message.

    EngineTunables  (YAML `engine:`)   -> EngineConfig = tunables + Hardware + checkpoint trust
    VisionTunables  (YAML `vision:`)   -> VisionConfig = tunables + Hardware
    VisionClientConfig (YAML `vision:`, the LM replica's side of the pool)
    ImageLimits (runtime.images) and ContentLimits (runtime.requests, YAML `limits:`)

Sizes are in the YAML's units (MiB, ms); the `*_bytes` / `*_s` properties give what the code uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from runtime.images import ImageLimits

if TYPE_CHECKING:
    import torch

MiB = 2**20
FORBID = ConfigDict(extra="forbid")  # a misspelt setting is an error, never a silent default

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True, config=FORBID)
class Hardware:
    """Where a service computes: the YAML's top-level dtype and device, the same for both pools."""

    dtype: Dtype = "float32"
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        from runtime.models.common import DTYPES  # torch, imported only by the services that compute

        return DTYPES[self.dtype]


@dataclass(frozen=True, config=FORBID)
class EngineTunables:
    kv_cache_mb: int = Field(default=256, ge=1, description="paged latent KV cache per LM replica")
    block_size: int = Field(default=16, ge=1, le=1024)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=1024, ge=16)
    max_prefill_tokens_while_decoding: int | None = Field(
        default=256, ge=1, description="prompt tokens a step may take while it also decodes (None: the whole "
                                       "budget): lower, shorter inter-token gaps when requests arrive, longer "
                                       "TTFT for long prompts (runtime.lm_service.scheduler)")
    prefix_caching: bool = True
    kv_fp8: bool = False
    ep_size: int = Field(default=1, ge=1, description="expert-parallel ranks per LM replica")
    ep_timeout_s: float = Field(default=120.0, gt=0)
    threads_per_rank: int = Field(default=1, ge=1, description="torch threads of each rank")
    # Streams through the LM replica only (ep_size > 1): an engine-core process pushes each step's
    # outputs to the router, which merges only what piled up (runtime.router.lm_streams).
    stream_interval_ms: float = Field(default=5.0, ge=0, description="merge streamed tokens after the first over this")

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache_mb * MiB

    @property
    def stream_interval_s(self) -> float:
        return self.stream_interval_ms / 1e3


@dataclass(frozen=True, config=FORBID)
class EngineConfig(EngineTunables, Hardware):
    """What one LM engine runs with."""

    num_blocks: int | None = Field(default=None, ge=1, description="None: as many as kv_cache_mb holds")
    batch_decodes: bool = True
    # May the checkpoint's own tokenizer code run (runtime.checkpoint.tokenizer_loader).
    trust_remote_code: bool = False


@dataclass(frozen=True, config=FORBID)
class VisionTunables(ImageLimits):
    cache_mb: float = Field(default=256, gt=0, description="embedding cache per vision replica")
    lease_s: float = Field(default=600.0, gt=0, description="a reference whose release never comes expires after this")
    max_batch: int = Field(default=16, ge=1)
    max_wait_s: float = Field(default=0.0, ge=0, description="how long a batch waits for more images once it has "
                              "one (0: it takes what queued while the tower was busy and runs at once)")

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * MiB)


@dataclass(frozen=True, config=FORBID)
class VisionConfig(VisionTunables, Hardware):
    """What one vision replica runs with (its ImageLimits included)."""


@dataclass(frozen=True, config=FORBID)
class VisionClientConfig:
    """The LM replica's side of the vision pool."""

    encode_timeout_s: float = Field(default=120.0, gt=0,
                                    description="the encode call, queueing at the vision pool included")
    arrival_timeout_s: float = Field(default=30.0, gt=0,
                                     description="embeddings pushed but not arrived by then fail the request")


def fields_of(cls: Any, values: Any) -> dict[str, Any]:
    """The values of `cls`'s fields from a settings object that has them (a YAML section)."""
    return {name: getattr(values, name) for name in cls.__dataclass_fields__}
