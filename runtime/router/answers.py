"""Shaping a plan's LM outputs into the HTTP answer: one JSON body, OpenAI SSE chunks, or SGLang's
/generate shapes, and the error bodies that end a request once it is running.

The wire format itself is runtime.router.openai_api's (and generate_api's); this module decides which
of those shapes a plan gets, in what order, and what a failure becomes. Every response it makes is
counted in the router's telemetry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from runtime.protocol import RequestOutput
from runtime.requests import ResponseOptions
from runtime.router import generate_api
from runtime.router import openai_api as api
from runtime.router.assistant import AssistantStream
from runtime.router.lm_streams import LMFailed, LMStreams, Plan
from runtime.router.metrics import RequestTimer, RouterMetrics

log = logging.getLogger(__name__)


def internal_error(request_id: str, e: BaseException) -> api.ApiError:
    """Serving failed on our side: the traceback goes to the router's log, and the client hears what
    failed and the request id that finds it there, never the exception's own text."""
    log.error("%s: failed", request_id, exc_info=e)
    what = "the LM replica serving it failed" if isinstance(e, LMFailed) else "the router failed"
    return api.ApiError(500, f"request {request_id} failed: {what}; the server's log has the details",
                        "server_error")


def timed_out(request_id: str, timeout_s: float) -> api.ApiError:
    log.warning("%s: timed out after %s s", request_id, timeout_s)
    return api.ApiError(504, f"request timed out after {timeout_s} s", "timeout_error")


class WeightsSeen:
    """The newest LM weights version this router has seen, in answers and in admin outcomes."""

    def __init__(self) -> None:
        self.newest = 0

    def saw(self, versions: Iterable[int]) -> int:
        self.newest = max([self.newest, *versions])
        return self.newest

    def header(self, dones: list[api.Completion] | None = None) -> dict[str, str]:
        """x-weights-version: the version that answered (a stream's headers go before its first
        output: there, the newest version this router has seen)."""
        versions = [d.last.weights_version for d in dones or [] if d.last is not None]
        self.saw(versions)
        return {"x-weights-version": str(max(versions) if versions else self.newest)}


class _ChoiceStream:
    """Per-choice state of a streamed answer."""

    def __init__(self, assistant: AssistantStream | None, echo: api.Echo | None):
        self.assistant = assistant  # chat: the reasoning and tool-call parsers of this choice
        self.echo = echo  # sent with the first chunk, then None
        self.offset = 0  # characters of this choice's text sent so far (completions' text_offset)
        self.last: RequestOutput | None = None


class Answers:
    """A plan's answer, from the streams of `streams`: `model` is the name answers carry, `tokenizer`
    renders logprobs and echoes, `telemetry` counts every response by status, `weights` makes the
    x-weights-version header."""

    def __init__(self, streams: LMStreams, model: str, tokenizer: Any, telemetry: RouterMetrics,
                 weights: WeightsSeen):
        self.streams = streams
        self.model = model
        self.tokenizer = tokenizer
        self.telemetry = telemetry
        self.weights = weights

    def error(self, error: api.ApiError) -> Response:
        self.telemetry.count(error.status)
        return JSONResponse(error.body(), error.status, headers=error.headers)

    async def respond(self, plan: Plan, chat: bool, timer: RequestTimer) -> Response:
        if plan.generate is not None:  # SGLang's /generate answers in its own shapes
            return await self._generate_answer(plan, plan.generate, timer)
        if plan.options.stream:
            return StreamingResponse(self.sse(plan, chat, timer), media_type="text/event-stream",
                                     headers=self.weights.header())
        return await self._whole(plan, chat, timer)

    def _ended_early(self, request_id: str, e: Exception) -> api.ApiError:
        """What a client hears when its streams end early: the request timeout, or a failure on our side."""
        if isinstance(e, TimeoutError):
            return timed_out(request_id, self.streams.timeout_s)
        return internal_error(request_id, e)

    # --- whole answers -------------------------------------------------------------------------

    async def _gather(self, plan: Plan, timer: RequestTimer) -> list[api.Completion] | Response:
        """Every choice's whole answer, or the error response that ends the request."""
        try:
            dones = await self.streams.gather(plan, timer)
        except Exception as e:
            return self.error(self._ended_early(plan.request_id, e))
        for done in dones:
            assert done.last is not None
            if done.last.finish_reason == "error":
                return self.error(api.engine_error(done.last))
        timer.finish()
        self.telemetry.count(200)
        return dones

    async def _whole(self, plan: Plan, chat: bool, timer: RequestTimer) -> Response:
        dones = await self._gather(plan, timer)
        if isinstance(dones, Response):
            return dones
        opts, tok = plan.options, self.tokenizer
        if chat:
            choices = [api.chat_choice(i, d, AssistantStream(plan.reasoning, plan.tools), opts.logprobs,
                                       opts.return_token_ids, tok) for i, d in enumerate(dones)]
        else:
            choices = [api.completion_choice(i, d, opts.logprobs, opts.return_token_ids, tok,
                                             opts.skip_special_tokens, plan.echoes[i]) for i, d in enumerate(dones)]
        one_prompt = len(plan.gens) == plan.n
        if opts.return_token_ids and not one_prompt:
            for choice, gen in zip(choices, plan.gens, strict=True):
                choice["prompt_token_ids"] = gen.prompt_ids
        prompt_ids = plan.gens[0].prompt_ids if opts.return_token_ids and one_prompt else None
        body = api.response(plan.request_id, self.model, "chat.completion" if chat else "text_completion", choices,
                            dones, plan.n, prompt_ids)
        return JSONResponse(body, headers=self.weights.header(dones))

    # --- OpenAI SSE ----------------------------------------------------------------------------

    async def sse(self, plan: Plan, chat: bool, timer: RequestTimer) -> AsyncIterator[bytes]:
        rid, created, opts = plan.request_id, int(time.time()), plan.options
        streams = [_ChoiceStream(AssistantStream(plan.reasoning, plan.tools) if chat else None, echo)
                   for echo in plan.echoes]
        failed, roles_sent = False, not chat
        try:
            async for index, out in self.streams.merged(plan):
                if not roles_sent:  # with the first output, as vLLM does: a client's TTFT is the first token's
                    roles_sent = True
                    for i in range(len(plan.gens)):
                        yield api.sse(api.chat_chunk(rid, self.model, created, {"role": "assistant", "content": ""},
                                                     token_ids=[] if opts.return_token_ids else None, index=i))
                timer.tokens(len(out.token_ids))
                streams[index].last = out
                if out.finish_reason == "error":
                    failed = True
                    yield api.sse(api.engine_error(out).body())
                    break
                yield api.sse(api.with_routed_experts(self._chunk(rid, created, index, out, opts, streams[index]), out))
        except Exception as e:
            failed = True
            yield api.sse(self._ended_early(plan.request_id, e).body())
        lasts = [s.last for s in streams if s.last is not None]
        if not failed and len(lasts) == len(streams):
            timer.finish()
            if opts.include_usage:
                yield api.sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": self.model, "choices": [],
                               "usage": api.usage(lasts, plan.n)})
        self.telemetry.count(500 if failed or not lasts else 200)
        yield api.sse("[DONE]")

    def _chunk(self, rid: str, created: int, index: int, out: RequestOutput, options: ResponseOptions,
               stream: _ChoiceStream) -> dict[str, Any]:
        token_ids = out.token_ids if options.return_token_ids else None
        if stream.assistant is None:
            return self._completion_chunk(rid, created, index, out, options, stream, token_ids)
        delta = stream.assistant.delta(out.text, out.finished)  # before finish_reason: it counts the calls
        logprobs = api.chat_logprobs(out.logprobs or [], self.tokenizer) if options.logprobs else None
        return api.chat_chunk(rid, self.model, created, delta, stream.assistant.finish_reason(out.finish_reason),
                              logprobs, token_ids, index)

    def _completion_chunk(self, rid: str, created: int, index: int, out: RequestOutput, options: ResponseOptions,
                          stream: _ChoiceStream, token_ids: list[int] | None) -> dict[str, Any]:
        """The first chunk of an echoed choice carries the prompt's text (and its logprobs) first."""
        echo, stream.echo = stream.echo, None
        text = out.text if echo is None else echo.text + out.text
        logprobs = None
        if options.logprobs:
            logprobs = api.completion_logprobs(echo, out.prompt_logprobs, out.logprobs or [], out.token_ids,
                                               self.tokenizer, options.skip_special_tokens, stream.offset)
        stream.offset += len(text)
        return api.completion_chunk(rid, self.model, created, text, out.finish_reason, logprobs, token_ids, index)

    # --- SGLang's /generate (runtime.router.generate_api) ----------------------------------------

    async def _generate_answer(self, plan: Plan, gen: generate_api.GenerateBody, timer: RequestTimer) -> Response:
        if gen.stream:
            return StreamingResponse(self._generate_sse(plan, gen, timer), media_type="text/event-stream",
                                     headers=self.weights.header())
        dones = await self._gather(plan, timer)
        if isinstance(dones, Response):
            return dones
        answers = [generate_api.answer(g.request_id, d.text, d.token_ids, d.logprobs, d.last, gen,
                                       d.last.weights_version) for g, d in zip(plan.gens, dones, strict=True)
                   if d.last is not None]
        one = len(answers) == 1 and not gen.batched
        return JSONResponse(answers[0] if one else answers, headers=self.weights.header(dones))

    async def _generate_sse(self, plan: Plan, gen: generate_api.GenerateBody,
                            timer: RequestTimer) -> AsyncIterator[bytes]:
        """Each event: one sample's whole answer so far (SGLang's default), with its index when several."""
        dones = [api.Completion() for _ in plan.gens]
        many = len(plan.gens) > 1 or gen.batched
        failed = False
        try:
            async for index, out in self.streams.merged(plan):
                timer.tokens(len(out.token_ids))
                if out.finish_reason == "error":
                    failed = True
                    yield api.sse(api.engine_error(out).body())
                    break
                done = dones[index]
                done.add(out)
                event = generate_api.answer(plan.gens[index].request_id, done.text, done.token_ids, done.logprobs,
                                            out, gen, out.weights_version)
                yield api.sse(event | {"index": index} if many else event)
        except Exception as e:
            failed = True
            yield api.sse(self._ended_early(plan.request_id, e).body())
        if not failed:
            timer.finish()
        self.telemetry.count(500 if failed else 200)
        yield api.sse("[DONE]")
