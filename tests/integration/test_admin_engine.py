"""Admin operations on an engine (runtime.lm_service.admin), in the replica's thread (AsyncEngine),
in an engine-core process (EngineClient) and with expert parallelism: sleep and wake free and bring
back the KV cache (and the weights), drain lets requests finish while abort ends them, and a weight
update serves the new checkpoint's greedy answers or, refused, leaves the old weights serving."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from runtime.lm_service.async_engine import AsyncEngine
from runtime.lm_service.engine import EngineHooks
from runtime.lm_service.engine_client import EngineClient
from runtime.lm_service.loading import build_engine
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import AdminAbort, AdminSleep, AdminUpdateWeights, AdminWake, SamplingParams
from runtime.settings import EngineConfig

CONFIG = EngineConfig(kv_cache_mb=8, block_size=4, stream_interval_ms=0)  # each output streamed alone
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11]


async def answer(engine, rid: str, params: SamplingParams = GREEDY,
                 prompt: list[int] = PROMPT) -> tuple[list[int], str]:
    tokens, reason = [], ""
    async for out in engine.add_request(EngineRequest(rid, prompt, params)):
        tokens += out.token_ids
        reason = out.finish_reason or reason
    return tokens, reason or ""


def greedy_of(path: Path) -> list[int]:
    async def main() -> list[int]:
        engine = AsyncEngine(build_engine(path, CONFIG))
        try:
            return (await answer(engine, "ref"))[0]
        finally:
            engine.close()

    return asyncio.run(main())


def broken_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights))
    return dst


def refusals(tiny: Path, odd: Path, root: Path) -> dict[str, Path]:
    def drop_one(t: dict) -> None:
        del t[next(n for n in sorted(t) if "layers.1.self_attn" in n)]

    def as_int(t: dict) -> None:
        name = next(n for n in sorted(t) if n.endswith("norm.weight"))
        t[name] = t[name].to(dtype=__import__("torch").int32)

    return {"another shape": odd, "missing tensor": broken_copy(tiny, root / "missing", drop_one),
            "bad dtype": broken_copy(tiny, root / "int", as_int), "no checkpoint": root / "nowhere"}


@pytest.mark.parametrize("where", ["thread", "process"])
def test_sleep_wake_drain_abort_and_update(checkpoints, tmp_path, where) -> None:
    a, b = checkpoints("tiny"), checkpoints("tiny", seed=1)
    want_a, want_b = greedy_of(a), greedy_of(b)
    assert want_a != want_b
    bad = refusals(a, checkpoints("odd"), tmp_path)

    async def main() -> None:
        if where == "thread":
            engine = AsyncEngine(build_engine(a, CONFIG))
        else:
            engine = EngineClient(str(a), CONFIG, EngineHooks(need_embeddings=lambda r, i: None), "127.0.0.1")
        try:
            # drain: requests in flight finish whole, then the KV memory goes
            long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            flying = [asyncio.create_task(answer(engine, f"d{i}", long)) for i in range(3)]
            await asyncio.sleep(0.05)
            slept = await engine.admin(AdminSleep(level=1, mode="drain"))
            assert slept.ok and slept.sleep_level == 1
            assert [len(t) for t, _ in await asyncio.gather(*flying)] == [40, 40, 40]
            refused = await answer(engine, "asleep")
            assert refused == ([], "error")
            assert (await engine.admin(AdminWake())).sleep_level == 0
            assert (await answer(engine, "a1"))[0] == want_a
            # abort: in-flight requests end at once; level 2 drops the weights, wake reads them again
            flying = [asyncio.create_task(answer(engine, f"x{i}", SamplingParams(max_tokens=2000, ignore_eos=True)))
                      for i in range(2)]
            await asyncio.sleep(0.3)
            slept = await engine.admin(AdminSleep(level=2, mode="abort"))
            assert slept.ok and slept.aborted == 2 and slept.sleep_level == 2
            assert {reason for _, reason in await asyncio.gather(*flying)} == {"abort"}
            await engine.admin(AdminWake())
            assert (await answer(engine, "a2"))[0] == want_a
            # a refused update leaves the old weights serving
            for name, path in bad.items():
                result = await engine.admin(AdminUpdateWeights(str(path), 7))
                assert not result.ok and result.error_type == "invalid_request", name
                assert result.weights_version == 0
            assert (await answer(engine, "a3"))[0] == want_a
            updated = await engine.admin(AdminUpdateWeights(str(b), 1))
            assert updated.ok and updated.weights_version == 1, updated
            assert (await answer(engine, "b1"))[0] == want_b
            # abort by id
            flying = [asyncio.create_task(answer(engine, f"y{i}", SamplingParams(max_tokens=2000, ignore_eos=True)))
                      for i in range(2)]
            await asyncio.sleep(0.3)
            assert (await engine.admin(AdminAbort(["y1", "unknown"]))).aborted == 1
            flying[0].cancel()
            assert (await flying[1])[1] == "abort"
            await asyncio.sleep(0.5)
            stats = engine.stats()
            assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.weights_version == 1
        finally:
            engine.close()

    asyncio.run(main())


def test_expert_parallel_update_sleep_and_wake(checkpoints, tmp_path) -> None:
    # The original dialect stores each expert apart, so one of rank 1's experts can be missing alone.
    a, b = checkpoints("tiny", "original"), checkpoints("tiny", "original", seed=1)
    want_a, want_b = greedy_of(a), greedy_of(b)
    config = EngineConfig(kv_cache_mb=8, block_size=4, ep_size=2, stream_interval_ms=0)

    def drop_expert(t: dict) -> None:  # the last expert belongs to rank 1: only that rank notices
        experts = [n for n in t if re.search(r"\.experts\.\d+\.", n)]
        del t[max(experts, key=lambda n: int(re.search(r"\.experts\.(\d+)\.", n).group(1)))]

    missing = broken_copy(a, tmp_path / "missing-expert", drop_expert)

    async def main() -> None:
        engine = AsyncEngine(build_engine(a, config))
        try:
            assert (await answer(engine, "a"))[0] == want_a
            refused = await engine.admin(AdminUpdateWeights(str(missing), 1))
            assert not refused.ok and "rank 1" in (refused.error or ""), refused
            assert (await answer(engine, "a-again"))[0] == want_a
            assert (await engine.admin(AdminUpdateWeights(str(b), 1))).ok
            assert (await answer(engine, "b"))[0] == want_b
            assert (await engine.admin(AdminSleep(level=2))).sleep_level == 2
            assert (await engine.admin(AdminWake())).ok
            assert (await answer(engine, "b-again"))[0] == want_b
        finally:
            engine.close()

    asyncio.run(main())
