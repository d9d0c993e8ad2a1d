"""The step scheduler: token budget, chunked prefill, admission, preemption and prefix caching.

`_Engine` plays the engine's part: it schedules a step, checks the output against the scheduler's
invariants, marks it computed, samples a deterministic fake token for every chunk that samples, and
removes a request once it has generated its max tokens. It also keeps a fake KV cache (one entry per
block slot, identifying the whole prefix written there) so that every chunk can check that the cache
it attends to holds exactly its own prefix: a wrong prefix hit, a block written while another request
holds it, or a block reused too early shows up as a mismatch.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from runtime.lm_service.scheduler import ImageSpan, Scheduler, SchedulerConfig, SchedulerOutput, Sequence
from tests.unit.lm_service.pool_view import cached_free


def _token(seq: Sequence) -> int:
    """The fake sampled token: deterministic, so expected outputs are known in advance."""
    return 1000 + len(seq.token_ids)


def _expected_output(prompt_len: int, max_tokens: int) -> list[int]:
    return [1000 + prompt_len + k for k in range(max_tokens)]


@dataclass
class _Step:
    chunks: list[tuple[str, int, int, bool]]  # (request_id, start, num_tokens, samples)
    preempted: list[str]
    output: SchedulerOutput


def _is_in(seq: Sequence, seqs) -> bool:
    return any(x is seq for x in seqs)


class _Engine:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.s = Scheduler(config)
        self.max_tokens: dict[str, int] = {}
        self.finished: list[Sequence] = []
        self.kv: dict[tuple[int, int], int] = {}  # (block id, offset) -> identity of the prefix written there
        self.steps: list[_Step] = []
        self.max_holders = 0  # the most requests seen holding one block at once

    def add(self, seq: Sequence, max_tokens: int) -> Sequence:
        self.max_tokens[seq.request_id] = max_tokens
        self.s.add(seq)
        return seq

    def step(self) -> _Step:
        s = self.s
        out = s.schedule()
        self._check_output(out)
        record = _Step([(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks],
                       [v.request_id for v in out.preempted], out)
        self._check_blocks()
        s.on_computed(out)
        for chunk, (*_, samples) in zip(out.chunks, record.chunks, strict=True):
            seq = chunk.seq
            assert seq.num_computed == chunk.start + chunk.num_tokens
            if samples:
                seq.token_ids.append(_token(seq))
                if len(seq.output_ids) >= self.max_tokens[seq.request_id]:
                    s.remove(seq)
                    self.finished.append(seq)
        self._check_blocks()
        self.steps.append(record)
        return record

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.s.has_work():
                return
            self.step()
        raise AssertionError(f"no progress after {max_steps} steps")

    # -- invariants ---------------------------------------------------------------------------------

    def _prefix_ids(self, seq: Sequence) -> list[int]:
        """An identity for every prefix of seq: its tokens and the content of the images they belong to."""
        out, prev = [], 0
        for p, tok in enumerate(seq.token_ids):
            images = tuple(span.content_hash for _, span in seq.images_overlapping(p, p + 1))
            prev = hash((prev, tok, images))
            out.append(prev)
        return out

    def _check_output(self, out: SchedulerOutput) -> None:
        s, size = self.s, self.config.block_size
        assert 0 < out.num_tokens <= self.config.max_num_batched_tokens or not out.chunks
        assert len(s.running) <= self.config.max_num_seqs
        assert len({id(c.seq) for c in out.chunks}) == len(out.chunks), "a request scheduled twice in one step"
        for victim in out.preempted:
            assert not _is_in(victim, s.running) and _is_in(victim, s.waiting)
            assert victim.table.block_ids == [] and victim.num_computed == 0
        front = list(s.waiting)[: len(out.preempted)]
        assert all(a is b for a, b in zip(front, reversed(out.preempted), strict=True)), "preempted not at front"
        for c in out.chunks:
            seq = c.seq
            assert _is_in(seq, s.running)
            assert c.num_tokens >= 1
            assert c.start == seq.num_computed, "a chunk must continue where the request's KV ends"
            assert c.start + c.num_tokens <= seq.num_tokens
            assert len(seq.table.block_ids) * size >= c.start + c.num_tokens, "no block for a scheduled token"
            assert all(span.ready for _, span in seq.images_overlapping(c.start, c.start + c.num_tokens))
            ids = self._prefix_ids(seq)
            for p in range(c.start):  # what the chunk attends to must be its own prefix
                assert self.kv.get((seq.table.block_ids[p // size], p % size)) == ids[p], (
                    f"{seq.request_id}: KV at position {p} is not its own prefix")
            for p in range(c.start, c.start + c.num_tokens):
                block = s.pool.blocks[seq.table.block_ids[p // size]]
                assert block.ref_count == 1, f"{seq.request_id} writes into block {block.block_id} held by others"
                assert block.hash is None, f"{seq.request_id} overwrites cached block {block.block_id}"
                self.kv[(block.block_id, p % size)] = ids[p]

    def _check_blocks(self) -> None:
        s = self.s
        holders: Counter[int] = Counter()
        for seq in s.running:
            assert len(set(seq.table.block_ids)) == len(seq.table.block_ids)
            assert seq.num_computed <= seq.num_tokens
            assert len(seq.table.block_ids) * self.config.block_size >= seq.num_computed
            holders.update(seq.table.block_ids)
        for seq in s.waiting:
            assert seq.table.block_ids == [] and seq.num_computed == 0
        for block in s.pool.blocks:
            assert block.ref_count == holders[block.block_id], f"block {block.block_id}: refcount vs holders"
            if holders[block.block_id] > 1:
                assert block.hash is not None, f"block {block.block_id} shared but not a prefix-cache block"
        assert s.pool.num_used == len(holders)
        self.max_holders = max(self.max_holders, *holders.values(), 0)


def _seq(rid: str, tokens: list[int], images: list[ImageSpan] | None = None) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), images=images or [])


def _config(**kw) -> SchedulerConfig:
    base = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, prefix_caching=True,
                max_prefill_tokens_while_decoding=None)
    return SchedulerConfig(**{**base, **kw})


def test_config_rejects_non_positive_limits() -> None:
    for kw in ({"block_size": 0}, {"max_num_seqs": 0}, {"max_num_batched_tokens": 0}):
        with pytest.raises(ValueError):
            _config(**kw)


# 1 ---------------------------------------------------------------------------------------------------

def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_and_only_the_last_samples() -> None:
    eng = _Engine(_config(max_num_batched_tokens=8))
    seq = eng.add(_seq("a", list(range(20))), max_tokens=2)

    assert eng.step().chunks == [("a", 0, 8, False)]
    assert seq.num_computed == 8 and seq.num_tokens == 20
    assert eng.step().chunks == [("a", 8, 8, False)]
    assert seq.num_computed == 16 and seq.num_tokens == 20
    assert eng.step().chunks == [("a", 16, 4, True)]
    assert seq.num_computed == 20 and seq.output_ids == [1020]
    assert eng.step().chunks == [("a", 20, 1, True)]  # then a one-token decode
    assert eng.finished == [seq] and seq.output_ids == _expected_output(20, 2)
    assert eng.s.pool.num_used == 0 and not eng.s.has_work()


# 2 ---------------------------------------------------------------------------------------------------

def test_a_decode_and_a_new_prefill_share_a_step() -> None:
    eng = _Engine(_config(max_num_batched_tokens=8))
    a = eng.add(_seq("a", [1, 2, 3, 4, 5]), max_tokens=5)
    assert eng.step().chunks == [("a", 0, 5, True)]

    b = eng.add(_seq("b", list(range(100, 112))), max_tokens=1)
    step = eng.step()
    assert step.chunks == [("a", 5, 1, True), ("b", 0, 7, False)]  # the decode first, the prefill gets the rest
    assert step.output.num_tokens == 8
    assert eng.step().chunks == [("a", 6, 1, True), ("b", 7, 5, True)]
    eng.run()
    assert a.output_ids == _expected_output(5, 5) and b.output_ids == _expected_output(12, 1)


def test_while_decoding_a_step_takes_at_most_the_prefill_cap_of_prompt_tokens() -> None:
    """Arrivals queue behind the cap while a stream decodes; alone, a prompt gets the whole budget."""
    eng = _Engine(_config(max_num_batched_tokens=32, max_prefill_tokens_while_decoding=6))
    alone = eng.add(_seq("alone", list(range(20))), max_tokens=8)
    assert eng.step().chunks == [("alone", 0, 20, True)]  # nothing decoding yet: the whole budget

    b = eng.add(_seq("b", list(range(100, 104))), max_tokens=2)
    c = eng.add(_seq("c", list(range(200, 210))), max_tokens=2)
    assert eng.step().chunks == [("alone", 20, 1, True), ("b", 0, 4, True), ("c", 0, 2, False)]
    assert eng.step().chunks == [("alone", 21, 1, True), ("b", 4, 1, True), ("c", 2, 6, False)]
    assert eng.step().chunks == [("alone", 22, 1, True), ("c", 8, 2, True)]  # b finished
    eng.run()
    assert alone.output_ids == _expected_output(20, 8) and c.output_ids == _expected_output(10, 2)
    assert b.output_ids == _expected_output(4, 2)


def test_the_prefill_cap_must_be_positive() -> None:
    with pytest.raises(ValueError):
        _config(max_prefill_tokens_while_decoding=0)


# 3 ---------------------------------------------------------------------------------------------------

def test_max_num_seqs_caps_the_running_set() -> None:
    eng = _Engine(_config(max_num_seqs=2))
    seqs = [eng.add(_seq(f"r{i}", [i + 1] * 3), max_tokens=2 + i) for i in range(3)]

    assert [c[0] for c in eng.step().chunks] == ["r0", "r1"]
    assert eng.s.running == seqs[:2] and list(eng.s.waiting) == [seqs[2]]
    assert [c[0] for c in eng.step().chunks] == ["r0", "r1"]  # r0 finishes here
    assert eng.finished == [seqs[0]]
    assert [c[:2] for c in eng.step().chunks] == [("r1", 4), ("r2", 0)]  # its place goes to r2
    while eng.s.has_work():
        assert len(eng.step().chunks) <= 2
    assert [s.output_ids for s in seqs] == [_expected_output(3, n) for n in (2, 3, 4)]


# 4 ---------------------------------------------------------------------------------------------------

def test_a_request_waiting_for_its_image_is_skipped_not_blocking() -> None:
    eng = _Engine(_config())
    span = ImageSpan(1, 4, "img-1", ready=False)
    a = eng.add(_seq("a", [7, 0, 0, 0, 8, 9], images=[span]), max_tokens=2)
    b = eng.add(_seq("b", [1, 2, 3]), max_tokens=3)

    assert eng.step().chunks == [("b", 0, 3, True)]  # a is skipped, b admitted past it
    assert list(eng.s.waiting) == [a] and a.table.block_ids == []
    assert eng.step().chunks == [("b", 3, 1, True)]
    span.ready = True
    assert eng.step().chunks == [("b", 4, 1, True), ("a", 0, 6, True)]
    eng.run()
    assert a.output_ids == _expected_output(6, 2) and b.output_ids == _expected_output(3, 3)


# 5 ---------------------------------------------------------------------------------------------------

def test_admission_waits_for_free_blocks() -> None:
    eng = _Engine(_config(num_blocks=4, prefix_caching=False))
    a = eng.add(_seq("a", list(range(12))), max_tokens=2)  # 3 blocks, then a 4th for its first decode
    b = eng.add(_seq("b", list(range(50, 58))), max_tokens=1)  # 2 blocks
    c = eng.add(_seq("c", [99]), max_tokens=1)  # 1 block: would fit, but is queued behind b

    assert eng.step().chunks == [("a", 0, 12, True)]
    assert eng.s.pool.num_free == 1 and list(eng.s.waiting) == [b, c]
    assert eng.step().chunks == [("a", 12, 1, True)]  # a finishes and frees its 4 blocks
    assert eng.finished == [a] and eng.s.pool.num_used == 0
    assert eng.step().chunks == [("b", 0, 8, True), ("c", 0, 1, True)]
    assert eng.s.preemptions == 0
    assert b.output_ids == _expected_output(8, 1) and c.output_ids == _expected_output(1, 1)
    assert eng.s.pool.num_used == 0


# 6 ---------------------------------------------------------------------------------------------------

def test_the_newest_request_is_preempted_when_blocks_run_out_and_both_still_finish() -> None:
    eng = _Engine(_config(num_blocks=4))  # 16 token slots; each request needs 9 (4 + 6 - 1) of KV
    a = eng.add(_seq("a", [1, 2, 3, 4]), max_tokens=6)
    b = eng.add(_seq("b", [5, 6, 7, 8]), max_tokens=6)

    for _ in range(5):  # both prefill, then decode positions 4..7: all 4 blocks used
        step = eng.step()
        assert [c[0] for c in step.chunks] == ["a", "b"] and step.preempted == []
    assert eng.s.pool.num_free == 0 and a.num_computed == b.num_computed == 8

    step = eng.step()  # a's position 8 needs a 3rd block: b, the newest, makes room
    assert step.preempted == ["b"] and step.chunks == [("a", 8, 1, True)]
    assert b.num_computed == 0 and b.table.block_ids == [] and b.num_preemptions == 1
    assert eng.s.preemptions == 1 and a.num_preemptions == 0
    assert list(eng.s.waiting) == [b] and eng.s.running == []  # a finished in that step
    assert b.output_ids == [1004, 1005, 1006, 1007, 1008]  # its tokens so far are kept

    # b recomputes: its head block survived in the prefix cache (its tail was reused by a).
    step = eng.step()
    assert step.chunks == [("b", 4, 5, True)] and b.prefix_hit_tokens == 4
    assert a.output_ids == _expected_output(4, 6) and b.output_ids == _expected_output(4, 6)
    assert eng.finished == [a, b] and eng.s.preemptions == 1
    assert eng.s.pool.num_used == 0 and not eng.s.has_work()


def test_preemption_when_the_front_request_grows_picks_the_last_admitted() -> None:
    eng = _Engine(_config(num_blocks=6, prefix_caching=False))
    seqs = [eng.add(_seq(f"r{i}", [10 * i + k for k in range(4)]), max_tokens=8) for i in range(3)]
    eng.step()  # three prefills of one block each
    for _ in range(4):
        assert eng.step().preempted == []  # decodes at 4..7 take a second block each: all 6 used
    assert eng.s.pool.num_free == 0
    step = eng.step()
    assert step.preempted == ["r2"] and [c[0] for c in step.chunks] == ["r0", "r1"]
    assert seqs[2].num_preemptions == 1 and list(eng.s.waiting) == [seqs[2]]
    eng.run()
    assert [s.output_ids for s in seqs] == [_expected_output(4, 8)] * 3
    assert eng.s.pool.num_used == 0


# 7 ---------------------------------------------------------------------------------------------------

def test_a_shared_prefix_is_reused_after_the_first_request_finished() -> None:
    eng = _Engine(_config())
    first = eng.add(_seq("first", list(range(1, 11))), max_tokens=1)  # 10 tokens: 2 full blocks
    eng.run()
    assert eng.finished == [first] and eng.s.pool.num_used == 0 and eng.s.prefix_hit_tokens == 0

    second = eng.add(_seq("second", list(range(1, 9)) + [50, 51, 52]), max_tokens=2)
    assert eng.step().chunks == [("second", 8, 3, True)]
    assert second.prefix_hit_tokens == 8 and eng.s.prefix_hit_tokens == 8
    eng.run()
    assert second.output_ids == _expected_output(11, 2) and eng.s.pool.num_used == 0

    # Only the first block matches: the second block's tokens differ.
    third = eng.add(_seq("third", [1, 2, 3, 4, 5, 6, 7, 0, 9]), max_tokens=1)
    assert eng.step().chunks == [("third", 4, 5, True)]
    assert third.prefix_hit_tokens == 4 and eng.s.prefix_hit_tokens == 12


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    eng = _Engine(_config())
    eng.add(_seq("first", list(range(1, 9))), max_tokens=1)  # exactly 2 full blocks, both registered
    eng.run()
    assert cached_free(eng.s.pool) == 2

    again = eng.add(_seq("again", list(range(1, 9))), max_tokens=1)
    assert eng.step().chunks == [("again", 4, 4, True)]  # hit capped at (8 - 1) // 4 = 1 block
    assert again.prefix_hit_tokens == 4

    longer = eng.add(_seq("longer", list(range(1, 10))), max_tokens=1)  # 9 tokens: both blocks usable
    assert eng.step().chunks == [("longer", 8, 1, True)]
    assert longer.prefix_hit_tokens == 8

    tiny = eng.add(_seq("tiny", [1, 2, 3, 4]), max_tokens=1)  # one cached block, but it must compute one token
    assert eng.step().chunks == [("tiny", 0, 4, True)]
    assert tiny.prefix_hit_tokens == 0


def test_same_tokens_with_a_different_image_get_no_prefix_hit() -> None:
    eng = _Engine(_config())
    tokens = [7, 0, 0, 8, 9, 10, 11, 12, 13, 14]  # the image's placeholders at 1..2, inside block 0
    eng.add(_seq("a", tokens, images=[ImageSpan(1, 3, "img-a", ready=True)]), max_tokens=1)
    eng.run()

    other = eng.add(_seq("b", tokens, images=[ImageSpan(1, 3, "img-b", ready=True)]), max_tokens=1)
    assert eng.step().chunks == [("b", 0, 10, True)]
    assert other.prefix_hit_tokens == 0

    same = eng.add(_seq("c", tokens, images=[ImageSpan(1, 3, "img-a", ready=True)]), max_tokens=1)
    assert eng.step().chunks == [("c", 8, 2, True)]  # the positive control: the same image hits
    assert same.prefix_hit_tokens == 8

    text = eng.add(_seq("d", tokens), max_tokens=1)  # the same ids as plain text: no hit either
    assert eng.step().chunks == [("d", 0, 10, True)]
    assert text.prefix_hit_tokens == 0


def test_without_prefix_caching_nothing_is_reused() -> None:
    eng = _Engine(_config(prefix_caching=False))
    for rid in ("a", "b"):
        eng.add(_seq(rid, list(range(1, 11))), max_tokens=1)
        eng.run()
    assert [s.chunks for s in eng.steps] == [[("a", 0, 10, True)], [("b", 0, 10, True)]]
    assert eng.s.prefix_hit_tokens == 0 and cached_free(eng.s.pool) == 0


def test_requests_running_together_share_cached_blocks() -> None:
    eng = _Engine(_config())
    prefix = list(range(1, 9))
    a = eng.add(_seq("a", prefix + [20]), max_tokens=4)
    eng.step()  # a's two full blocks are registered after this step
    b = eng.add(_seq("b", prefix + [30, 31]), max_tokens=4)
    assert eng.step().chunks == [("a", 9, 1, True), ("b", 8, 2, True)]
    assert a.table.block_ids[:2] == b.table.block_ids[:2]
    assert all(eng.s.pool.blocks[i].ref_count == 2 for i in a.table.block_ids[:2])
    eng.s.remove(a)
    assert all(eng.s.pool.blocks[i].ref_count == 1 for i in b.table.block_ids[:2])
    eng.run()
    assert b.output_ids == _expected_output(10, 4) and eng.s.pool.num_used == 0


# 8 ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix_caching", [True, False])
def test_removing_waiting_running_and_preempted_requests_frees_everything(prefix_caching: bool) -> None:
    eng = _Engine(_config(num_blocks=4, max_num_seqs=2, prefix_caching=prefix_caching))
    a = eng.add(_seq("a", [1, 2, 3, 4]), max_tokens=100)
    b = eng.add(_seq("b", [5, 6, 7, 8]), max_tokens=100)
    c = eng.add(_seq("c", [9]), max_tokens=100)  # waits: max_num_seqs
    for _ in range(20):
        if eng.step().preempted:
            break
    else:
        raise AssertionError("a 4-block pool never preempted two growing requests")
    assert b.num_preemptions == 1 and list(eng.s.waiting) == [b, c] and eng.s.running == [a]

    eng.s.remove(c)  # waiting
    assert list(eng.s.waiting) == [b]
    eng.s.remove(b)  # preempted
    assert not eng.s.waiting
    eng.step()
    eng.s.remove(a)  # running
    assert eng.s.pool.num_used == 0 and not eng.s.has_work()
    assert all(block.ref_count == 0 for block in eng.s.pool.blocks)
    assert eng.s.pool.num_free == 4


def test_removing_a_request_in_the_middle_of_its_prefill_frees_its_blocks() -> None:
    eng = _Engine(_config(max_num_batched_tokens=4))
    a = eng.add(_seq("a", list(range(30))), max_tokens=1)
    eng.step()
    eng.step()
    assert a.num_computed == 8 and eng.s.pool.num_used == 2
    eng.s.remove(a)
    assert eng.s.pool.num_used == 0 and not eng.s.has_work()
    eng.s.remove(a)  # a second remove is harmless
    assert eng.s.pool.num_used == 0


# 9 ---------------------------------------------------------------------------------------------------

_IMAGE_TOKEN = 0  # the placeholder id; the random prompts' text tokens are never 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    cap = None if seed % 2 else 5  # half the seeds with a prefill cap while decoding
    config = SchedulerConfig(num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=16,
                             prefix_caching=True, max_prefill_tokens_while_decoding=cap)
    eng = _Engine(config)
    bases = [[rng.randrange(1, 50) for _ in range(40)] for _ in range(3)]  # shared prefixes: cache hits

    arrivals: dict[int, list[tuple[Sequence, int]]] = {}
    for i in range(40):
        n = rng.randint(1, 40)
        if rng.random() < 0.6:
            keep = rng.randint(0, n)
            tokens = rng.choice(bases)[:keep] + [rng.randrange(1, 50) for _ in range(n - keep)]
        else:
            tokens = [rng.randrange(1, 50) for _ in range(n)]
        images = []
        if n >= 3 and rng.random() < 0.3:  # like the engine: the span is exactly a run of placeholder ids
            start, length = rng.randrange(0, n - 2), rng.randint(1, 6)
            tokens[start:start + 2] = [_IMAGE_TOKEN] * length
            images = [ImageSpan(start, start + length, f"img-{rng.randrange(3)}", ready=rng.random() < 0.5)]
        arrivals.setdefault(rng.randrange(60), []).append((_seq(f"r{i}", tokens, images), rng.randint(1, 10)))

    live: list[Sequence] = []
    aborted: list[Sequence] = []
    step = 0
    while arrivals or eng.s.has_work():
        for seq, max_tokens in arrivals.pop(step, []):
            live.append(eng.add(seq, max_tokens))
        for seq in live:
            for span in seq.images:
                if not span.ready and rng.random() < 0.2:
                    span.ready = True
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            eng.s.remove(victim)
            aborted.append(victim)
            eng._check_blocks()
        if eng.s.has_work():
            eng.step()
        for seq in eng.s.running:  # like the engine: embeddings are dropped once their positions are computed
            for span in seq.images:  # (a preempted request must then wait for them again)
                if span.end <= seq.num_computed:
                    span.ready = False
        live = [s for s in live if not _is_in(s, eng.finished) and not _is_in(s, aborted)]
        step += 1
        assert step < 3000, "the workload does not finish"

    assert len(eng.finished) + len(aborted) == 40
    for seq in eng.finished:
        assert seq.output_ids == _expected_output(seq.prompt_len, eng.max_tokens[seq.request_id])
    assert eng.s.pool.num_used == 0
    assert all(block.ref_count == 0 for block in eng.s.pool.blocks)
    # The workload exercised what it is meant to exercise.
    assert eng.s.prefix_hit_tokens > 0 and eng.max_holders >= 2 and eng.s.preemptions > 0
    assert sum(len(s.chunks) for s in eng.steps) > len(eng.steps)
    assert max(len(s.chunks) for s in eng.steps) >= 3
