"""Running a plan against the LM pool: one handle stream per choice, retried once, fanned back in.

The router holds no tensors: what it runs is a Plan of GenerateRequests, and what comes back is
RequestOutputs. Every way a stream can end early (client gone, timeout, replica death) cancels its
handle call, and the LM replica then frees the request's KV blocks and releases its vision references.

With a token inbox (runtime.router.token_inbox) each request names it as its reply_to: an LM
replica whose engine steps in a process of its own has the outputs pushed there, and its handle
call carries only what the replica itself says (a refusal, a dead engine) and ends with the
request; a replica that steps its engine itself streams every output through the call. Both feed
one queue per request, so the reader does not care which.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec

from runtime.protocol import GenerateRequest, RequestOutput, merge_outputs
from runtime.requests import ResponseOptions
from runtime.router import generate_api
from runtime.router import openai_api as api
from runtime.router.assistant import ToolUse
from runtime.router.metrics import RequestTimer
from runtime.router.token_inbox import TokenInbox

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Plan:
    """What one HTTP request runs: a GenerateRequest per choice, in choice order (each prompt's n
    choices together), and how to shape the answer."""

    request_id: str
    gens: list[GenerateRequest]
    n: int
    options: ResponseOptions
    echoes: list[api.Echo | None]
    reasoning: bool = False  # chat: the prompt leaves the answer inside a thinking block
    tools: ToolUse | None = None  # chat: the answer is parsed for these tools' calls
    generate: generate_api.GenerateBody | None = None  # SGLang's /generate: answered in its shapes

    def leader(self, index: int) -> int | None:
        """The choice whose prefill another choice of the same prompt waits for (None: starts at once)."""
        first = index - index % self.n
        return None if first == index else first


def fan_out(gen: GenerateRequest, n: int) -> list[GenerateRequest]:
    """n choices of one prompt: their own request ids, and seed + index as each one's seed."""
    if n == 1:
        return [gen]
    seed = gen.sampling.seed
    return [msgspec.structs.replace(gen, request_id=f"{gen.request_id}-{i}", sampling=msgspec.structs.replace(
        gen.sampling, seed=None if seed is None else (seed + i) % 2**64 if i else seed)) for i in range(n)]


class LMFailed(Exception):
    """The LM stream failed; `retryable`: before it produced anything (another replica may serve it)."""

    def __init__(self, retryable: bool):
        super().__init__("the LM replica failed " + ("before answering" if retryable else "while answering"))
        self.retryable = retryable


@dataclasses.dataclass(frozen=True)
class _CallEnded:
    """The handle call ended (error None) or failed."""

    error: BaseException | None = None


class LMStreams:
    """The router's streams from the LM pool (a Serve handle to LMService), each bounded by the
    request timeout; `in_flight` counts the choices being served now (the 429 limit reads it).
    `last_output_wait_s`: how long a request whose handle call ended waits for its last output
    to reach the inbox (the engine core sends it before it tells the replica, on another socket)."""

    def __init__(self, lm: Any, timeout_s: float, inbox: TokenInbox | None = None, last_output_wait_s: float = 5.0):
        self.lm = lm
        self.timeout_s = timeout_s
        self.inbox = inbox
        self.last_output_wait_s = last_output_wait_s
        self.in_flight = 0

    async def merged(self, plan: Plan) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of every choice as they come. A prompt's later choices start once
        its first choice has produced its first output: its prompt is then in the prefix cache."""
        if len(plan.gens) == 1:
            async for out in self.outputs(plan.gens[0]):
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        started = [asyncio.Event() for _ in plan.gens]

        async def pump(index: int) -> None:
            try:
                if (leader := plan.leader(index)) is not None:
                    await started[leader].wait()
                async for out in self.outputs(plan.gens[index]):
                    started[index].set()
                    queue.put_nowait((index, out))
                queue.put_nowait((index, None))
            except Exception as e:  # not swallowed: re-raised to the reader, which logs it
                queue.put_nowait((index, e))
            finally:
                started[index].set()

        tasks = [asyncio.create_task(pump(i)) for i in range(len(plan.gens))]
        try:
            for _ in range(len(plan.gens)):
                while True:
                    index, item = await queue.get()
                    if item is None:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()  # each cancelled stream aborts its request on the LM replica

    async def gather(self, plan: Plan, timer: RequestTimer) -> list[api.Completion]:
        """Every choice's whole answer (an engine error is in its last output); raises what ended the
        streams early (TimeoutError, LMFailed, ...)."""
        dones = [api.Completion() for _ in plan.gens]
        async for index, out in self.merged(plan):
            timer.tokens(len(out.token_ids))
            dones[index].add(out)
        return dones

    async def outputs(self, gen: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The LM stream, retried once on another replica if the first died before answering, and
        bounded by the request timeout."""
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                for attempt in range(2):
                    try:
                        async for out in self._attempt(gen):
                            yield out
                        return
                    except LMFailed as e:
                        if attempt == 1 or not e.retryable:
                            raise
                        log.warning("%s: the LM replica failed before answering; trying again", gen.request_id,
                                    exc_info=True)
        finally:
            self.in_flight -= 1

    async def _attempt(self, gen: GenerateRequest) -> AsyncIterator[RequestOutput]:
        queue: asyncio.Queue[RequestOutput | _CallEnded]
        with self._opened(gen) as (gen, queue):
            stream = self.lm.options(stream=True).generate.remote(gen)
            call = asyncio.create_task(_pump_call(stream, queue))
            produced = False
            try:
                async for out in self._read(gen.request_id, queue):
                    produced = True
                    yield out
            except LMFailed as e:
                e.retryable = not produced
                raise
            finally:
                call.cancel()
                stream.cancel()  # a no-op when it finished; otherwise the LM replica aborts the request

    @contextlib.contextmanager
    def _opened(self, gen: GenerateRequest) -> Iterator[tuple[GenerateRequest, asyncio.Queue]]:
        if self.inbox is None:
            yield gen, asyncio.Queue()
            return
        self.inbox.start()
        with self.inbox.opened(gen.request_id) as queue:
            yield msgspec.structs.replace(gen, reply_to=self.inbox.address), queue

    async def _read(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Outputs until the last one (what piled up is merged into one); LMFailed if the call failed,
        or if it ended and the last output did not follow within last_output_wait_s."""
        call_ended, failure = False, None
        while failure is None:
            try:
                async with asyncio.timeout(self.last_output_wait_s if call_ended else None):
                    item = await queue.get()
            except TimeoutError:
                log.error("%s: the LM replica ended the call but the last output never came", request_id)
                raise LMFailed(retryable=False) from None
            outs: list[RequestOutput] = []
            while True:
                if isinstance(item, _CallEnded):
                    call_ended, failure = True, item.error
                else:
                    outs.append(item)
                if failure is not None or (outs and outs[-1].finished) or queue.empty():
                    break
                item = queue.get_nowait()
            if outs:
                out = merge_outputs(outs)
                yield out
                if out.finished:
                    return
        raise LMFailed(retryable=False) from failure


async def _pump_call(stream: Any, queue: asyncio.Queue) -> None:
    """Whatever the handle call yields goes to the request's queue, then how the call ended."""
    try:
        async for out in stream:
            queue.put_nowait(out)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        queue.put_nowait(_CallEnded(e))
    else:
        queue.put_nowait(_CallEnded())
