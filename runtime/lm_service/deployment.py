"""The LM pool as a Ray Serve deployment: one engine per replica (replica count = data-parallel size).

`generate(GenerateRequest)` is a streaming handle call: the replica registers the request's images
with its ImageFeed, hands the request to its engine, and yields RequestOutputs until the last one.
The feed asks the vision pool for the images (embeddings arrive over ZMQ at the engine's inbox,
whose address travels as `reply_to`) and, once the engine reports that the request ended for any
reason (it then freed the request's KV blocks and embeddings), releases the vision pool's references.

With `engine_process` the engine steps in a process of its own (runtime.lm_service.engine_core)
and owns the inbox; otherwise it steps on a thread of the replica (expert parallelism: the replica
is rank 0 and its worker ranks are Ray actors in its placement group). If the engine dies, the
health check fails and the request router skips the replica until Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import msgspec
import ray
import torch
from ray import serve

from runtime import logs, serve_compat
from runtime.errors import RequestError
from runtime.lm_service.admin import Admission
from runtime.lm_service.async_engine import AsyncEngine
from runtime.lm_service.engine import EngineHooks
from runtime.lm_service.engine_client import EngineClient
from runtime.lm_service.engine_loop import error_output
from runtime.lm_service.image_feed import ImageFeed, feed_hooks
from runtime.lm_service.loading import build_engine
from runtime.lm_service.ray_ranks import ray_launcher
from runtime.lm_service.request_state import EngineRequest
from runtime.node_address import node_ip
from runtime.protocol import AdminCall, AdminResult, ErrorKind, GenerateRequest, RequestOutput
from runtime.settings import EngineConfig, VisionClientConfig
from runtime.stats_board import Reporter, board, rss_bytes
from runtime.transport import EmbeddingSender

log = logging.getLogger(__name__)


def _current_weights(app_name: str) -> tuple[str, int] | None:
    """(path, version) of the weights the admin endpoints last loaded into the pool, if any."""
    state = ray.get(board(app_name).admin_state.remote(), timeout=30)
    return (state["weights_path"], state["weights_version"]) if state["weights_version"] else None


def _log_end(request_id: str, last: RequestOutput | None, seconds: float) -> None:
    if last is None or not last.finished:
        log.info("%s: the caller left after %.3f s; aborted", request_id, seconds)
    elif last.finish_reason == "error":
        log.warning("%s: failed after %.3f s (%s): %s", request_id, seconds, last.error_type, last.error)
    else:
        log.info("%s: finished (%s) after %.3f s: %d prompt tokens (%d cached), %d completion tokens", request_id,
                 last.finish_reason, seconds, last.prompt_tokens, last.cached_tokens, last.completion_tokens)


@serve.deployment(name="LMService", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256,
                  health_check_period_s=5,
                  request_router_config={"request_router_class": "runtime.router.request_router:AffinityRouter",
                                         "request_routing_stats_period_s": 1.0})
class LMService:
    def __init__(self, model_dir: str, engine: EngineConfig = EngineConfig(), vision: Any = None,
                 host: str | None = None, vision_client: VisionClientConfig = VisionClientConfig(),
                 rank_resources: dict[str, float] | None = None, engine_process: bool = False,
                 proxy: str | None = None, log_level: logs.LogLevel = "INFO"):
        logs.to_serve(log_level)
        serve_compat.apply_in_replica()
        self.config, self.model_dir = engine, model_dir
        torch.set_num_threads(self.config.threads_per_rank)
        host = host or node_ip()
        context = serve.get_replica_context()
        weights = _current_weights(context.app_name)  # a replica that starts after an update serves it too
        # The engine reports each request's ending (and a preempted request's lost embeddings) to the
        # feed, which is made once the engine's inbox exists to receive what the feed asks for.
        hooks = feed_hooks(lambda event: self.feed.post(event))
        self.engine = self._start_engine(hooks, host, weights, engine_process, rank_resources)
        self.feed = ImageFeed(vision, self.engine, self.engine.inbox_address,
                              EmbeddingSender(self.engine.inbox_address, proxy=proxy), vision_client)
        self.admission = Admission()
        self.replica = context.replica_id.unique_id
        self.reporter = Reporter("lm", self.replica, context.app_name, self.snapshot)
        self._log_ready(weights)

    def _start_engine(self, hooks: EngineHooks, host: str, weights: tuple[str, int] | None, engine_process: bool,
                      rank_resources: dict[str, float] | None) -> AsyncEngine | EngineClient:
        if engine_process:  # the engine steps in its own process; embeddings go straight to it
            return EngineClient(self.model_dir, self.config, hooks, host, weights=weights)
        # EP worker ranks are Ray actors in this replica's placement group (on its node).
        launch = ray_launcher(rank_resources or {"CPU": 0}) if self.config.ep_size > 1 else None
        stepped = build_engine(self.model_dir, self.config, hooks, launch)
        if weights is not None:
            stepped.load_weights(*weights)
        return AsyncEngine(stepped, inbox_host=host)

    def _log_ready(self, weights: tuple[str, int] | None) -> None:
        c = self.config
        where = f"process {self.engine.pid}" if isinstance(self.engine, EngineClient) else "thread"
        log.info("LM replica %s ready: model %s (weights version %d), engine in a %s, %s on %s, ep_size %d, KV cache "
                 "%d MiB in blocks of %d, up to %d sequences and %d batched tokens; embeddings arrive at %s",
                 self.replica, self.model_dir, weights[1] if weights else 0, where, c.dtype, c.device, c.ep_size,
                 c.kv_cache_bytes // 2**20, c.block_size, c.max_num_seqs, c.max_num_batched_tokens,
                 self.engine.inbox_address)

    # --- the handle API ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs; with request.reply_to and an engine-core process, the core pushes
        them to that router's token inbox itself, and this call yields only errors made here (a
        refusal, a dead engine) and returns when the request ended."""
        rid = request.request_id
        if (refusal := await self.admission.enter()) is not None:  # waits while an admin operation runs
            log.info("%s: refused: %s", rid, refusal)
            yield error_output(rid, refusal, ErrorKind.UNAVAILABLE)
            return
        self.feed.expect(rid, request.images)
        try:
            keys = tuple(request.image_keys)  # the router's; nothing here hashes an image again
            stream = self.engine.add_request(EngineRequest(rid, request.prompt_ids, request.sampling, keys),
                                             reply_to=request.reply_to)
        except RequestError as e:
            log.info("%s: refused: %s", rid, e)
            self.feed.forget(rid)
            yield error_output(rid, str(e), ErrorKind.INVALID_REQUEST)
            return
        except BaseException:  # nothing was admitted; the caller hears the error (a dead engine: it retries)
            self.feed.forget(rid)
            raise
        log.info("%s: admitted: %d prompt tokens, %d image(s)", rid, len(request.prompt_ids), len(request.images))
        started, last = time.perf_counter(), None
        try:
            self.feed.encode(rid)
            async for out in stream:
                last = out
                if out.relayed:  # the engine core sent the outputs to the router itself: the call ends
                    break
                yield out
        finally:
            self.engine.abort(rid)  # a no-op when it finished; frees everything when the caller left
            _log_end(rid, last, time.perf_counter() - started)

    async def admin(self, call: AdminCall) -> AdminResult:
        """One admin operation on this replica's engine (the router sends one to every replica)."""
        if call.replica != self.replica:
            return AdminResult(self.replica, False, f"meant for replica {call.replica}", ErrorKind.INTERNAL)
        result = await self.admission.run(call.op, self.engine.admin)
        return msgspec.structs.replace(result, replica=self.replica)

    async def stats(self) -> dict[str, Any]:
        return self.snapshot()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the request router (runtime.router.request_router)."""
        stats = self.engine.stats()
        return {"running": stats.running, "waiting": stats.waiting, "healthy": self.engine.error is None,
                "kv_usage": stats.kv_blocks_used / max(stats.kv_blocks_total, 1)}

    async def ping(self) -> str:
        """Readiness: answers once the engine is loaded (the constructor finished)."""
        return self.replica

    def snapshot(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "engine_pid": self.engine.pid if isinstance(self.engine, EngineClient) else os.getpid(),
            "address": self.engine.inbox_address,
            "engine": asdict(self.engine.stats()),
            "healthy": self.engine.error is None,
            "vision_client": asdict(self.feed.stats()),
            "malformed_messages": self.engine.malformed_messages,
            "rss_bytes": rss_bytes() + (rss_bytes(self.engine.pid) if isinstance(self.engine, EngineClient) else 0),
        }

    async def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"engine stopped: {self.engine.error}")
        await asyncio.sleep(0)

    def __del__(self) -> None:
        self.reporter.close()
        self.engine.close()
