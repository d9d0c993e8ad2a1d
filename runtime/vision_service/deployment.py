"""The vision pool as a Ray Serve deployment: one VisionEncoder per replica.

LM replicas call `encode(EncodeRequest)` through a handle; embeddings go back over ZMQ, straight
to the request's `reply_to`. Every replica binds a release socket whose address is its identity:
it travels back in `EncodeAccepted.sender` and in every EmbeddingHeader, and the LM replica
pushes `ReleaseRequest(request_id)` there when the request ends. Releases are applied on the
replica's event loop, where the cache lives.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import asdict
from typing import Any

from ray import serve

from runtime import logs, serve_compat
from runtime.node_address import node_ip
from runtime.protocol import EncodeAccepted, EncodeRequest
from runtime.settings import VisionConfig
from runtime.stats_board import Reporter, rss_bytes
from runtime.transport import EmbeddingSender, ReleaseInbox
from runtime.vision_service.encoder import ImageInput, VisionEncoder

log = logging.getLogger(__name__)


# An encode call holds its slot only until its embeddings are pushed, and the batcher can only batch
# the calls it holds: Serve's default of 5 ongoing requests capped every batch at 5 images and
# queued a burst's other encodes in the LM replicas' handles. 64 lets a burst reach the tower as
# max_batch-sized batches; a YAML may still set its own.
@serve.deployment(name="VisionService", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class VisionService:
    def __init__(self, model_dir: str, config: VisionConfig = VisionConfig(), host: str | None = None,
                 proxy: str | None = None, log_level: logs.LogLevel = "INFO"):
        import torch

        logs.to_serve(log_level)
        serve_compat.apply_in_replica()
        self.config = config
        torch.set_num_threads(1)
        host = host or node_ip()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.releases = ReleaseInbox(self._release_from_thread, host)
        self.encoder = VisionEncoder(model_dir, self.config, self.releases.address,
                                     EmbeddingSender(self.releases.address, proxy=proxy))
        context = serve.get_replica_context()
        self.reporter = Reporter("vision", context.replica_id.unique_id, context.app_name, self._report)
        log.info("vision replica %s ready: model %s, %s on %s, cache %d MiB, batches of up to %d images; "
                 "releases at %s", context.replica_id.unique_id, model_dir, self.config.dtype, self.config.device,
                 self.config.cache_bytes // 2**20, self.config.max_batch, self.releases.address)

    def _release_from_thread(self, request_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.encoder.release, request_id)

    async def encode(self, request: EncodeRequest) -> EncodeAccepted:
        self._loop = asyncio.get_running_loop()
        images = [ImageInput(i.data, i.placeholders, i.key) for i in request.images]
        encoded = await self.encoder.encode(request.request_id, images, request.reply_to, request.indexes())
        return EncodeAccepted(self.releases.address, encoded)

    async def release(self, request_id: str) -> int:
        """Handle-call form of release (the ZMQ release socket is the usual path)."""
        return self.encoder.release(request_id)

    async def stats(self) -> dict[str, Any]:
        self.encoder.cache.reclaim_expired()
        return self.snapshot()

    async def ping(self) -> str:
        return self.releases.address

    def snapshot(self) -> dict[str, Any]:
        return {"address": self.releases.address, "pid": os.getpid(), "cache": asdict(self.encoder.cache.stats()),
                "batch_sizes": list(self.encoder._batcher.batch_sizes[-100:]), "rss_bytes": rss_bytes()}

    def _report(self) -> dict[str, Any]:
        """The reporter thread's view. It also reclaims expired leases (on the event loop, where the
        cache lives), so they are reclaimed even when nobody asks for stats."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.encoder.cache.reclaim_expired)
        return self.snapshot()

    def __del__(self) -> None:
        self.reporter.close()
        self.releases.close()
        self.encoder.close()
