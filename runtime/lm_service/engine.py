"""The LM engine of one replica: continuous batching over the paged latent cache.

Each step the scheduler picks tokens (decodes and prefill chunks together), the runner computes
them in one forward, and every request that reached the end of its known tokens samples one.
Requests join and leave between steps. Image embeddings arrive from outside (add_embeddings) and
are dropped as soon as the request's prefill has passed them, and always when the request ends.
When a request ends for any reason its KV blocks, its embeddings and its state are released, and
`hooks.released(request_id)` reports it (in an LM replica, to the ImageFeed that releases the
vision pool's references: runtime.lm_service.image_feed).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.errors import RequestError
from runtime.lm_service.grammar import GrammarBook
from runtime.lm_service.kv_cache import PagedLatentCache
from runtime.lm_service.request_state import EngineRequest, RequestState
from runtime.lm_service.runner import ImageRows, ModelRunner, StepInput
from runtime.lm_service.sampling import choose_rows
from runtime.lm_service.scheduler import ImageSpan, ScheduledChunk, Scheduler, SchedulerConfig, Sequence
from runtime.lm_service.weights import drop_weights, reload_language_model
from runtime.models.config import ModelConfig
from runtime.models.deepseek_v3 import DeepseekV3LM
from runtime.protocol import ErrorKind, RequestOutput
from runtime.settings import EngineConfig


def kv_blocks_for(config: EngineConfig, cfg: ModelConfig) -> int:
    """KV blocks of the engine: num_blocks when set, else as many as kv_cache_mb holds."""
    if config.num_blocks is not None:
        return config.num_blocks
    per_token = PagedLatentCache.bytes_per_token_limit(cfg.text, torch.uint8 if config.kv_fp8 else config.torch_dtype)
    return max(1, config.kv_cache_bytes // (per_token * config.block_size))


def _no_embeddings_needed(request_id: str, image_indexes: list[int]) -> None:
    raise RuntimeError(f"request {request_id} needs image embeddings {image_indexes} again, and no source is set")


@dataclass
class EngineHooks:
    """What the engine reports, from its step thread (or an EngineClient's reader thread); it never
    waits for an answer. An LM replica points both at its ImageFeed's one entry point
    (runtime.lm_service.image_feed.feed_hooks)."""

    # A preempted request dropped embeddings it needs again (re-ask the vision pool).
    need_embeddings: Callable[[str, list[int]], None] = _no_embeddings_needed
    # A request ended: release what other services hold for it.
    released: Callable[[str], None] = lambda request_id: None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_bytes_per_token: int
    prefix_hit_tokens: int
    prefill_tokens: int
    generated_tokens: int
    tokens_per_s: float
    last_step_ms: float
    mean_step_ms: float
    steps: int
    preemptions: int
    dropped_embeddings: int
    ep_size: int
    ep_expert_bytes: list[int] = field(default_factory=list)
    ep_rank_pids: list[int] = field(default_factory=list)
    sleep_level: int = 0
    weights_version: int = 0


def placeholder_runs(ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image placeholders: one run per image, in order."""
    runs: list[tuple[int, int]] = []
    for pos, token in enumerate(ids):
        if token == image_token_id:
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], pos + 1)
            else:
                runs.append((pos, pos + 1))
    return runs


class Engine:
    def __init__(self, lm: DeepseekV3LM, model_config: ModelConfig, config: EngineConfig,
                 eos_token_ids: tuple[int, ...], tokenizer: Any | None = None, hooks: EngineHooks | None = None,
                 expert_group: Any | None = None):
        self.model_config, self.config = model_config, config
        self.eos_token_ids, self.tokenizer = eos_token_ids, tokenizer
        self.hooks = hooks or EngineHooks()
        self.expert_group = expert_group
        num_blocks = kv_blocks_for(config, model_config)
        self.cache = PagedLatentCache(model_config.text, num_blocks, config.block_size, config.torch_dtype,
                                      config.device, config.kv_fp8)
        self.scheduler = Scheduler(SchedulerConfig(num_blocks, config.block_size, config.max_num_seqs,
                                                   config.max_num_batched_tokens, config.prefix_caching,
                                                   config.max_prefill_tokens_while_decoding))
        before = expert_group.begin_forward if expert_group is not None else None
        self.runner = ModelRunner(lm, model_config, self.cache, before, config.batch_decodes)
        self.states: dict[str, RequestState] = {}
        self.embeddings: dict[str, dict[int, torch.Tensor]] = {}
        self._pending: list[RequestOutput] = []
        self._counters = {"prefill_tokens": 0, "generated_tokens": 0, "steps": 0, "dropped_embeddings": 0}
        self._step_ms: deque[float] = deque(maxlen=100)
        self._generated: deque[tuple[float, int]] = deque(maxlen=200)
        self._generator = torch.Generator()  # draws for the requests without a seed of their own
        self._generator.manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.weights_version = 0  # bumped by each weight update (runtime.lm_service.admin)
        self.weights_path = ""  # the checkpoint the weights came from (a level-2 sleep reads it again)
        self.sleep_level = 0  # 0 awake, 1 KV cache memory freed, 2 the weights too
        self.grammars = GrammarBook(tokenizer, model_config.text.vocab_size, eos_token_ids,
                                    threads=config.threads_per_rank)

    # --- requests in -------------------------------------------------------------------------

    def check(self, request: EngineRequest) -> None:
        """Raise RequestError if the request can never run. Reads only the configuration, so any
        thread may call it while another steps the engine."""
        self._image_spans(request)
        self._max_tokens(request)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises RequestError (nothing queued) if it can never run."""
        if request.request_id in self.states:
            raise RequestError(f"request id {request.request_id!r} is already live", "request_id")
        spans = self._image_spans(request)
        max_tokens = self._max_tokens(request)
        seq = Sequence(request.request_id, list(request.prompt_ids), len(request.prompt_ids), spans,
                       reads_prefix_cache=request.params.reads_prefix_cache)
        spec = request.params.structured
        grammar = self.grammars.open(request.request_id, spec) if spec is not None else None
        self.states[request.request_id] = RequestState(request, seq, max_tokens, self.eos_token_ids, self.tokenizer,
                                                       grammar)
        self.embeddings[request.request_id] = {}
        self.scheduler.add(seq)

    def _image_spans(self, request: EngineRequest) -> list[ImageSpan]:
        if not request.prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        runs = placeholder_runs(request.prompt_ids, self.model_config.image_token_id)
        if len(runs) != len(request.image_hashes):
            raise RequestError(f"the prompt has {len(runs)} image placeholder run(s) but "
                               f"{len(request.image_hashes)} image hash(es) were given", "images")
        return [ImageSpan(start, end, h) for (start, end), h in zip(runs, request.image_hashes, strict=True)]

    def _max_tokens(self, request: EngineRequest) -> int:
        prompt = len(request.prompt_ids)
        limit = min(self.model_config.text.max_position_embeddings, self.scheduler.capacity_tokens)
        if prompt >= limit:
            raise RequestError(f"prompt is {prompt} tokens; this engine fits at most {limit - 1}", "messages")
        wanted = request.params.max_tokens
        if wanted is None:
            return limit - prompt
        if prompt + wanted > limit:
            raise RequestError(f"prompt ({prompt} tokens) + max_tokens ({wanted}) exceeds the limit of {limit} "
                               "tokens (context length or KV cache capacity)", "max_tokens")
        return wanted

    def add_embeddings(self, request_id: str, image_index: int, embeddings: torch.Tensor) -> bool:
        """Embeddings [tokens, hidden] of one image of a live request. Unknown requests (finished,
        aborted, never seen) are dropped and counted; a wrong shape fails the request."""
        state = self.states.get(request_id)
        if state is None:
            self._counters["dropped_embeddings"] += 1
            return False
        spans = state.seq.images
        if not 0 <= image_index < len(spans):
            self.fail(request_id, f"image index {image_index} out of range (the request has {len(spans)} images)")
            return False
        span = spans[image_index]
        expected = (span.end - span.start, self.model_config.text.hidden_size)
        if tuple(embeddings.shape) != expected:
            self.fail(request_id, f"image {image_index}: embeddings of shape {tuple(embeddings.shape)}, "
                                  f"expected {expected}")
            return False
        self.embeddings[request_id][image_index] = embeddings.to(self.cache.device, self.config.torch_dtype)
        span.ready = True
        return True

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.states.get(request_id)
        if state is None:
            return None
        self._release(state)
        return state.output([], "", "abort")

    def fail(self, request_id: str, message: str, error_type: ErrorKind = ErrorKind.INTERNAL) -> None:
        """End a request with an error (delivered by the next step)."""
        state = self.states.get(request_id)
        if state is not None:
            self._release(state)
            self._pending.append(state.output([], "", "error", error=message, error_type=error_type))

    def missing_embeddings(self, request_id: str) -> list[int]:
        """Indexes of the request's images whose embeddings it still waits for ([] if none or unknown)."""
        state = self.states.get(request_id)
        if state is None:
            return []
        seq = state.seq
        return [i for i, span in enumerate(seq.images) if not span.ready and span.end > seq.num_computed]

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every live request with an error; return those outputs (and any pending ones)."""
        for request_id in list(self.states):
            self.fail(request_id, message)
        outputs, self._pending = self._pending, []
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.states) or bool(self._pending)

    @property
    def steps_run(self) -> int:
        """Forwards run so far (a step with nothing schedulable does not count)."""
        return self._counters["steps"]

    # --- memory and weights (runtime.lm_service.admin drives these between steps) -------------

    def abort_requests(self, request_ids: list[str] | None = None) -> list[RequestOutput]:
        """End these live requests (every one with None) with finish_reason "abort"; their last outputs.
        An id also names the requests the router made of it (its n samples, its prompts: `id-...`)."""
        wanted, parts = set(request_ids or ()), tuple(f"{w}-" for w in request_ids or ())
        ids = [r for r in self.states if request_ids is None or r in wanted or r.startswith(parts)]
        return [out for rid in ids if (out := self.abort(rid)) is not None]

    def sleep(self, level: int) -> None:
        """Level 1 frees the KV cache's memory (and forgets the prefix cache); level 2 the weights too.
        Only while no request is live."""
        self.scheduler.reset_prefix_cache()
        self.cache.release()
        if level >= 2 and self.sleep_level < 2:
            drop_weights(self.runner.lm, self.expert_group)
        self.sleep_level = max(self.sleep_level, level)

    def wake(self) -> None:
        """Re-create what sleep freed; weights dropped at level 2 are read again from their checkpoint."""
        if self.sleep_level >= 2:
            self._install(self.weights_path)
        self.cache.allocate()
        self.sleep_level = 0

    def load_weights(self, path: str, version: int) -> None:
        """Serve the weights of checkpoint `path` (same shape) from now on, as `version`; raises
        CheckpointError (nothing changed) if any tensor is missing, of another shape or kind."""
        self._install(path)
        self.weights_path, self.weights_version = path, version
        self.scheduler.reset_prefix_cache()  # cached KV was computed by the old weights

    def _install(self, path: str) -> None:
        self.runner.lm = reload_language_model(path, self.model_config, self.config.torch_dtype, self.config.device,
                                               self.expert_group)
        self.sleep_level = min(self.sleep_level, 1)

    # --- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        for out in outputs:
            out.weights_version = self.weights_version
        return outputs

    def _step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        self._reask_embeddings(plan.preempted)
        if not plan.chunks:
            return outputs
        logits = self.runner.execute([self._step_input(c) for c in plan.chunks])
        for index, logprobs in logits.prompt.items():
            chunk = plan.chunks[index]
            self.states[chunk.seq.request_id].add_prompt_logprobs(chunk.start, logprobs)
        for index, rows in logits.routing.items():
            chunk = plan.chunks[index]
            self.states[chunk.seq.request_id].add_routing(chunk.start, rows)
        self.scheduler.on_computed(plan)
        outputs += self._sample([c for c in plan.chunks if c.samples], logits.sampled)
        self._drop_used_embeddings(plan.chunks)
        self._record(plan.chunks, outputs, started)
        return outputs

    def _step_input(self, chunk: ScheduledChunk) -> StepInput:
        seq, end = chunk.seq, chunk.start + chunk.num_tokens
        stored = self.embeddings[seq.request_id]
        images = [ImageRows(span.start, stored[i]) for i, span in seq.images_overlapping(chunk.start, end)]
        state = self.states[seq.request_id]
        return StepInput(seq.token_ids[chunk.start : end], seq.table.block_ids, chunk.start, chunk.samples, images,
                         state.prompt_targets(chunk.start, end), state.params.prompt_logprobs or 0,
                         state.routing is not None)

    def _sample(self, chunks: list[ScheduledChunk], logits: torch.Tensor) -> list[RequestOutput]:
        logits = logits.cpu()  # per-request generators are CPU generators; rows are small
        states = [self.states[chunk.seq.request_id] for chunk in chunks]
        raw = self.grammars.mask(states, logits) if self.grammars.live else {}  # structured output
        tokens = self._choose(states, logits)
        outputs = []
        for i, (state, token, row) in enumerate(zip(states, tokens, logits, strict=True)):
            out = state.accept(token, raw.get(i, row)) if state.max_tokens else state.finish_prompt_only()
            if out.finished:
                self._release(state)
            outputs.append(out)
        return outputs

    def _choose(self, states: list[RequestState], logits: torch.Tensor) -> list[int]:
        """One token per row: the plain rows (greedy or temperature only, no seed) in one batched
        draw, the rest each with its own generator and rules."""
        temperatures = [s.plain_temperature for s in states]
        plain = [i for i, t in enumerate(temperatures) if t is not None]
        tokens: list[int | None] = [None] * len(states)
        if plain:
            rows = logits if len(plain) == len(states) else logits[plain]  # no [B, V] copy when all are plain
            drawn = choose_rows(rows, [temperatures[i] or 0.0 for i in plain], self._generator)
            for i, token in zip(plain, drawn, strict=True):
                tokens[i] = token
        return [t if t is not None else state.sample(logits[i])
                for i, (state, t) in enumerate(zip(states, tokens, strict=True))]

    def _drop_used_embeddings(self, chunks: list[ScheduledChunk]) -> None:
        for chunk in chunks:
            stored = self.embeddings.get(chunk.seq.request_id)
            if stored is None:
                continue  # the request finished this step
            for i, span in enumerate(chunk.seq.images):
                if span.end <= chunk.seq.num_computed and i in stored:
                    del stored[i]
                    span.ready = False

    def _reask_embeddings(self, preempted: list[Sequence]) -> None:
        for seq in preempted:
            missing = [i for i, span in enumerate(seq.images) if not span.ready]
            if missing:
                self.hooks.need_embeddings(seq.request_id, missing)

    def _release(self, state: RequestState) -> None:
        self.scheduler.remove(state.seq)
        self.embeddings.pop(state.request_id, None)
        self.grammars.close(state.request_id)
        del self.states[state.request_id]
        self.hooks.released(state.request_id)

    # --- stats -------------------------------------------------------------------------------

    def _record(self, chunks: list[ScheduledChunk], outputs: list[RequestOutput], started: float) -> None:
        now = time.perf_counter()
        generated = sum(len(o.token_ids) for o in outputs)
        self._counters["steps"] += 1
        self._counters["generated_tokens"] += generated
        self._counters["prefill_tokens"] += sum(c.num_tokens for c in chunks if c.start < c.seq.prompt_len)
        self._step_ms.append((now - started) * 1e3)
        self._generated.append((now, generated))

    def stats(self) -> EngineStats:
        window = [(t, n) for t, n in self._generated if t > time.perf_counter() - 10.0]
        span = window[-1][0] - window[0][0] if len(window) > 1 else 0.0
        rate = sum(n for _, n in window[1:]) / span if span > 0 else 0.0
        pool = self.scheduler.pool
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=pool.num_used,
            kv_blocks_total=len(pool.blocks),
            kv_bytes_per_token=self.cache.bytes_per_token,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            prefill_tokens=self._counters["prefill_tokens"],
            generated_tokens=self._counters["generated_tokens"],
            tokens_per_s=rate,
            last_step_ms=self._step_ms[-1] if self._step_ms else 0.0,
            mean_step_ms=sum(self._step_ms) / len(self._step_ms) if self._step_ms else 0.0,
            steps=self._counters["steps"],
            preemptions=self.scheduler.preemptions,
            dropped_embeddings=self._counters["dropped_embeddings"],
            ep_size=self.config.ep_size,
            ep_expert_bytes=self.expert_group.expert_bytes() if self.expert_group is not None else [],
            ep_rank_pids=list(self.expert_group.rank_pids) if self.expert_group is not None else [],
            sleep_level=self.sleep_level,
            weights_version=self.weights_version,
        )

    def close(self) -> None:
        if self.expert_group is not None:
            self.expert_group.close()
            self.expert_group = None
