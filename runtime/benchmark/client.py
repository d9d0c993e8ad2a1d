"""Drive an OpenAI-compatible server with streamed chat requests and time every token.

For each request: TTFT (request sent -> first chunk carrying text), the gaps between chunks that
carry text (ITL), end-to-end latency, and the server's usage counts. Concurrency-bound (at most C
in flight) or rate-bound (Poisson arrivals at R requests/s).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    status: int = 0
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # one gap per text chunk after the first
    text_chunks: int = 0  # a server may send several tokens in one chunk
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or choice.get("text"):
            return True
    return False


async def send_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                   timeout_s: float) -> RequestResult:
    started = time.perf_counter()
    last = None
    result = RequestResult(ok=False)
    try:
        async with session.post(url, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:500]
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                now = time.perf_counter()
                if _has_text(chunk):
                    result.text_chunks += 1
                    if last is None:
                        result.ttft_s = now - started
                    else:
                        result.itl_s.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
        result.e2e_s = time.perf_counter() - started
        result.ok = last is not None
        if not result.ok:
            result.error = "no text in the stream"
    except (aiohttp.ClientError, TimeoutError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run(url: str, bodies: list[dict[str, Any]], concurrency: int | None, rate: float | None,
              api_key: str | None = None, timeout_s: float = 600, seed: int = 0,
              progress: Any = None) -> tuple[list[RequestResult], float]:
    """Send every body; return the results (in order) and the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency or len(bodies))
    rng = random.Random(seed)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(body: dict[str, Any], delay: float) -> RequestResult:
            await asyncio.sleep(delay)
            async with limit:
                out = await send_one(session, url, body, headers, timeout_s)
            if progress is not None:
                progress.update(1)
            return out

        delays, t = [], 0.0
        for _ in bodies:
            delays.append(t)
            if rate:
                t += rng.expovariate(rate)
        started = time.perf_counter()
        results = await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays, strict=True)))
        return list(results), time.perf_counter() - started
