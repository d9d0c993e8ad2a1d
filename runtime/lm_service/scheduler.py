"""Which tokens of which requests run in the next step. Pure Python: no torch, no tensors.

Each step has a token budget. Running requests go first, in admission order (a decode costs one
token, a prefill in progress takes what is left: chunked prefill). Waiting requests are admitted
first come, first served once their image embeddings are all present and their KV blocks fit;
a waiting request still missing embeddings is skipped, not allowed to block the queue.
When a running request needs a block and none is free, the most recently admitted request is
preempted: its blocks are released and it recomputes later (its computed full blocks stay in the
prefix cache, so the recompute is usually a prefix hit).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from runtime.lm_service.kv_blocks import BlockPool, BlockTable, block_hash


@dataclass(frozen=True)
class SchedulerConfig:
    """The engine's settings that the scheduler reads (their defaults are EngineConfig's)."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefix_caching: bool
    # Prompt tokens a step may take while it also decodes (None: the whole budget). A step's time
    # grows with its prompt tokens and every running stream waits for it: a cap spreads a burst of
    # arrivals over several short steps (each admission's TTFT barely moves: the decodes between
    # them are cheap), instead of one long gap in every stream.
    max_prefill_tokens_while_decoding: int | None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_prefill_tokens_while_decoding is not None and self.max_prefill_tokens_while_decoding < 1:
            raise ValueError("max_prefill_tokens_while_decoding must be positive")


@dataclass
class ImageSpan:
    """Placeholder positions [start, end) of one image, its content hash, and whether its
    embeddings are on this replica right now."""

    start: int
    end: int
    content_hash: str
    ready: bool = False


@dataclass(eq=False)  # identity: two requests are never the same request
class Sequence:
    """One request as the scheduler sees it: token ids, progress and KV blocks."""

    request_id: str
    token_ids: list[int]  # prompt, then generated tokens as they come
    prompt_len: int
    images: list[ImageSpan] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    table: BlockTable = field(default_factory=BlockTable)
    prefix_hit_tokens: int = 0
    num_preemptions: int = 0
    # False when every prompt position must be computed (its prompt logprobs are wanted).
    reads_prefix_cache: bool = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def images_ready(self) -> bool:
        return all(span.ready for span in self.images)

    def images_overlapping(self, start: int, end: int) -> Iterator[tuple[int, ImageSpan]]:
        for i, span in enumerate(self.images):
            if span.start < end and start < span.end:
                yield i, span


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so the step yields the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class _Budget:
    """One step's tokens: `total` for everything, `prefill` for prompt tokens (never more than total)."""

    def __init__(self, total: int, prefill_cap: int | None):
        self.total = total
        self.prefill = total if prefill_cap is None else min(total, prefill_cap)

    def grant(self, seq: Sequence) -> int:
        """How many of seq's uncomputed tokens this step can take."""
        left = seq.num_tokens - seq.num_computed
        return min(left, self.total if seq.num_computed >= seq.prompt_len else self.prefill)

    def spend(self, seq: Sequence, n: int) -> None:
        self.total -= n
        if seq.num_computed < seq.prompt_len:
            self.prefill = min(self.prefill - n, self.total)
        else:
            self.prefill = min(self.prefill, self.total)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.pool = BlockPool(config.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_hit_tokens = 0
        self.preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the KV memory was dropped, or the weights changed). Only
        with no request live: a fresh pool, every block free and unregistered."""
        if self.running or self.waiting or self.pool.num_used:
            raise RuntimeError("the prefix cache can be reset only while no request holds KV blocks")
        self.pool = BlockPool(self.config.num_blocks)

    def remove(self, seq: Sequence) -> None:
        """The request ended (finished, aborted, failed): forget it and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> SchedulerOutput:
        budget = _Budget(self.config.max_num_batched_tokens, self._prefill_cap())
        out = SchedulerOutput([], [])
        i = 0
        while i < len(self.running) and budget.total > 0:
            seq = self.running[i]
            n = budget.grant(seq)
            if n == 0:  # a prefill in progress, and this step's prompt tokens are spent
                i += 1
                continue
            if not self._reserve(seq, n, out):
                continue  # seq itself was preempted; self.running shrank
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget.spend(seq, n)
            i += 1
        if not out.preempted:
            self._admit(budget, out)
        return out

    def _prefill_cap(self) -> int | None:
        cap = self.config.max_prefill_tokens_while_decoding
        decoding = any(seq.num_computed >= seq.prompt_len for seq in self.running)
        return cap if decoding else None

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks for seq's next n tokens, preempting the newest running requests if needed."""
        need = self._blocks_needed(seq, n)
        while need > self.pool.num_free:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            out.chunks = [c for c in out.chunks if c.seq is not victim]
            if victim is seq:
                return False
        seq.table.block_ids += self.pool.allocate(need)
        return True

    def _admit(self, budget: _Budget, out: SchedulerOutput) -> None:
        for seq in list(self.waiting):
            if budget.prefill <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if not seq.images_ready:
                continue
            reads_cache = self.config.prefix_caching and seq.reads_prefix_cache
            hit = self._take_prefix(seq) if seq.num_computed == 0 and reads_cache else 0
            n = budget.grant(seq)
            need = self._blocks_needed(seq, n)
            if need > self.pool.num_free:
                self._release_blocks(seq)  # give the prefix hit back; retry next step
                seq.num_computed = 0
                break
            seq.table.block_ids += self.pool.allocate(need)
            seq.prefix_hit_tokens += hit
            self.prefix_hit_tokens += hit
            self.waiting.remove(seq)
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget.spend(seq, n)

    def _take_prefix(self, seq: Sequence) -> int:
        """Hold seq's cached leading blocks; return how many tokens they cover."""
        # Leave at least one token to compute: its logits give the next token.
        usable = (seq.num_tokens - 1) // self.config.block_size
        blocks = self.pool.take_cached(self._hashes(seq, usable)[:usable])
        seq.table.block_ids = blocks
        seq.table.registered = len(blocks)
        seq.num_computed = len(blocks) * self.config.block_size
        return seq.num_computed

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        size = self.config.block_size
        return max(0, -(-(seq.num_computed + n) // size) - len(seq.table.block_ids))

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Chain hashes of seq's first num_blocks full blocks (computed once, extended as needed)."""
        size, hashes = self.config.block_size, seq.table.hashes
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            # Where the image sits matters too: the same image at another offset is other KV.
            overlapping = seq.images_overlapping(start, start + size)
            images = [f"{span.content_hash}@{span.start - start}" for _, span in overlapping]
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_ids[start : start + size], images))
        return hashes

    def on_computed(self, out: SchedulerOutput) -> None:
        """The runner computed every chunk: advance progress, offer newly full blocks to the cache."""
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.num_tokens
            if not self.config.prefix_caching:
                continue
            full = seq.num_computed // self.config.block_size
            for idx, h in enumerate(self._hashes(seq, full)[seq.table.registered : full], seq.table.registered):
                self.pool.register(seq.table.block_ids[idx], h)
            seq.table.registered = max(seq.table.registered, full)

    def _preempt(self, seq: Sequence) -> None:
        self._release_blocks(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        self.pool.free(seq.table.block_ids)
        seq.table.block_ids = []
        seq.table.registered = 0
