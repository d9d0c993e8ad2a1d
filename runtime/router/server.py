"""The HTTP front door: an OpenAI-compatible FastAPI ingress on Ray Serve.

The router validates each request, renders and tokenizes it (RequestPreparer), and streams it from
an LM replica through a Serve handle. It holds no tensors. Every way a request can end early
(client gone, timeout, replica death) cancels the handle call, and the LM replica then frees the
request's KV blocks and releases its vision references.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations
# of the methods Serve wraps.

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from runtime import serve_compat
from runtime.config import AppConfig
from runtime.errors import RequestError
from runtime.protocol import GenerateRequest, RequestOutput
from runtime.requests import parse_chat_request, parse_sampling
from runtime.router import openai_api as api
from runtime.router.fetch import ImageFetcher
from runtime.router.metrics import RequestTimer, RouterMetrics, prometheus_text
from runtime.router.prepare import RequestPreparer
from runtime.stats_board import board

log = logging.getLogger("ray.serve")

http = FastAPI(title="kimi-runtime", docs_url=None, redoc_url=None)

# Module-level helpers go above the deployment class: Serve pickles the class when it is decorated.


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean", name)
    return value


class _ReplicaLost(Exception):
    """The LM replica failed before it produced anything: the request may be retried elsewhere."""


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(http)
class Router:
    def __init__(self, config: dict[str, Any], model_dir: str, lm: Any, vision: Any):
        serve_compat.iterate_in_flight_copies()
        self.config = AppConfig.model_validate(config)
        self.model = self.config.name
        self.lm, self.vision = lm, vision
        self.prep = RequestPreparer(model_dir, self.config.dtype, self.config.trust_remote_code,
                                    self.config.image_limits())
        self.think_ids = api.think_token_ids(self.prep.tokenizer)
        self.limits = self.config.request_limits()
        urls = self.config.image_urls
        self.fetcher = ImageFetcher(urls.fetch_timeout_s, self.limits.max_image_bytes, urls.allow_private_addresses)
        self.telemetry = RouterMetrics()
        self.board = board(serve.get_replica_context().app_name)
        self._in_flight = 0

    # --- endpoints -----------------------------------------------------------------------------

    @http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, self._prepare_chat, chat=True)

    @http.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._serve(request, self._prepare_completion, chat=False)

    @http.get("/v1/models")
    async def models(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "kimi-runtime",
                "max_model_len": self.prep.model_config.text.max_position_embeddings}
        return JSONResponse({"object": "list", "data": [card]})

    @http.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(asyncio.gather(self.lm.ping.remote(), self.vision.ping.remote()), 5.0)
        except Exception as e:
            return JSONResponse(api.error_body(f"not ready: {type(e).__name__}", "service_unavailable"), 503)
        return JSONResponse({"status": "ok"})

    @http.get("/stats")
    async def stats(self) -> Response:
        return JSONResponse(await self._stats())

    @http.get("/metrics")
    async def metrics(self) -> Response:
        return PlainTextResponse(prometheus_text(await self._stats()), media_type="text/plain; version=0.0.4")

    async def _stats(self) -> dict[str, Any]:
        pools = await self.board.snapshot.remote()
        return {"router": self.telemetry.snapshot(self._in_flight), "lm": pools.get("lm", {}),
                "vision": pools.get("vision", {})}

    # --- one request ---------------------------------------------------------------------------

    async def _serve(self, request: Request, prepare: Any, chat: bool) -> Response:
        timer = self.telemetry.timer()
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = await self._json_body(request)
            gen, options = await prepare(body)
        except RequestError as e:
            return self._error(api.ApiError(400, str(e), "invalid_request_error", e.field))
        except api.ApiError as e:
            return self._error(e)
        if self._in_flight >= self.config.limits.max_queued_requests:
            return self._error(api.ApiError(429, "too many requests in flight; retry shortly", "rate_limit_error",
                                            headers={"Retry-After": "1"}))
        if options["stream"]:
            return StreamingResponse(self._sse(gen, options, chat, timer), media_type="text/event-stream")
        return await self._whole(gen, options, chat, timer)

    def _auth(self, request: Request) -> Response | None:
        key = self.config.api_key
        if key is None or request.headers.get("authorization", "") == f"Bearer {key}":
            return None
        return self._error(api.ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                        "authentication_error"))

    async def _json_body(self, request: Request) -> dict[str, Any]:
        limit = int(self.config.limits.max_body_mb * 2**20)
        if int(request.headers.get("content-length") or 0) > limit:
            raise api.ApiError(413, f"request body is larger than {limit} bytes")
        raw = await request.body()
        if len(raw) > limit:
            raise api.ApiError(413, f"request body is larger than {limit} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise api.ApiError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise api.ApiError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model:
            raise api.ApiError(400, f"model {model!r} is not served here; this server serves {self.model!r}",
                               "invalid_request_error", "model")
        return body

    def _error(self, error: api.ApiError) -> Response:
        self.telemetry.count(error.status)
        return JSONResponse(error.body(), error.status, headers=error.headers)

    # --- preparing -----------------------------------------------------------------------------

    def _options(self, body: dict[str, Any], sampling: Any) -> dict[str, Any]:
        stream = _flag(body, "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        return {"stream": stream, "include_usage": bool(stream_options.get("include_usage", False)),
                "return_token_ids": _flag(body, "return_token_ids"), "logprobs": sampling.logprobs}

    async def _prepare_chat(self, body: dict[str, Any]) -> tuple[GenerateRequest, dict[str, Any]]:
        chat = parse_chat_request(body, self.prep.defaults.sampling, self.limits)
        if chat.image_urls:
            chat = dataclasses.replace(chat, images=await self.fetcher.fill(chat.images, chat.image_urls),
                                       image_urls=())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = await asyncio.to_thread(self.prep.prepare, rid, chat)  # hashing and tokenizing: off the loop
        options = self._options(body, chat.sampling)
        options["reasoning"] = api.starts_in_reasoning(gen.prompt_ids, self.think_ids)
        return gen, options

    async def _prepare_completion(self, body: dict[str, Any]) -> tuple[GenerateRequest, dict[str, Any]]:
        if body.get("echo"):
            raise RequestError("echo is not supported", "echo")
        # The completions API's logprobs is a count of alternatives, not the chat API's boolean.
        count = body.get("logprobs")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 20):
            raise RequestError("logprobs must be an integer in [0, 20]", "logprobs")
        chat_style = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs")}
        if count is not None:
            chat_style |= {"logprobs": True, "top_logprobs": count}
        sampling = parse_sampling(chat_style, self.prep.defaults.sampling, self.limits)
        ids = self._completion_prompt(body.get("prompt"))
        limit = self.prep.model_config.text.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(f"prompt is {len(ids)} tokens; the model's context is {limit} tokens", "prompt")
        gen = GenerateRequest(f"cmpl-{uuid.uuid4().hex}", ids, sampling)
        return gen, self._options(body, sampling)

    def _completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str) and prompt:
            return list(self.prep.tokenizer(prompt)["input_ids"])
        vocab = self.prep.model_config.text.vocab_size
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       and 0 <= t < vocab for t in prompt):
            if self.prep.model_config.image_token_id in prompt:
                raise RequestError("prompt token ids must not contain the image placeholder id", "prompt")
            return list(prompt)
        raise RequestError(f"prompt must be a non-empty string or a list of token ids in [0, {vocab}) "
                           "(one prompt per request)", "prompt")

    # --- running -------------------------------------------------------------------------------

    async def _outputs(self, gen: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The LM stream, retried once on another replica if the first died before answering, and
        bounded by the request timeout."""
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.config.limits.request_timeout_s):
                for attempt in range(2):
                    try:
                        async for out in self._attempt(gen):
                            yield out
                        return
                    except _ReplicaLost as e:
                        if attempt == 1:
                            raise RuntimeError(f"the LM replica failed: {e.__cause__}") from e
        finally:
            self._in_flight -= 1

    async def _attempt(self, gen: GenerateRequest) -> AsyncIterator[RequestOutput]:
        stream = self.lm.options(stream=True).generate.remote(gen)
        produced = False
        try:
            async for out in stream:
                produced = True
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            if produced:
                raise
            raise _ReplicaLost(str(e)) from e
        finally:
            stream.cancel()  # a no-op when it finished; otherwise the LM replica aborts the request

    async def _whole(self, gen: GenerateRequest, options: dict[str, Any], chat: bool, timer: RequestTimer
                     ) -> Response:
        done = api.Completion()
        try:
            async for out in self._outputs(gen):
                timer.tokens(len(out.token_ids))
                done.add(out)
        except TimeoutError:
            log.warning("request %s timed out", gen.request_id, exc_info=True)
            return self._error(api.ApiError(504, f"request timed out after {self.config.limits.request_timeout_s} s",
                                            "timeout_error"))
        except Exception as e:
            log.exception("request %s failed", gen.request_id)
            return self._error(api.ApiError(500, f"{type(e).__name__}: {e}", "server_error"))
        assert done.last is not None
        if done.last.finish_reason == "error":
            return self._error(api.engine_error(done.last))
        timer.finish()
        self.telemetry.count(200)
        if chat:
            splitter = api.ReasoningSplitter(True) if options["reasoning"] else None
            body = api.chat_response(gen.request_id, self.model, done, splitter, options["logprobs"],
                                     options["return_token_ids"], gen.prompt_ids, self.prep.tokenizer)
        else:
            body = api.completion_response(gen.request_id, self.model, done, options["logprobs"],
                                           options["return_token_ids"], gen.prompt_ids, self.prep.tokenizer)
        return JSONResponse(body)

    async def _sse(self, gen: GenerateRequest, options: dict[str, Any], chat: bool, timer: RequestTimer
                   ) -> AsyncIterator[bytes]:
        rid, created = gen.request_id, int(time.time())
        splitter = api.ReasoningSplitter(True) if chat and options["reasoning"] else None
        last: RequestOutput | None = None
        if chat:
            first: dict[str, Any] = {"role": "assistant", "content": ""}
            yield api.sse(api.chat_chunk(rid, self.model, created, first,
                                         token_ids=[] if options["return_token_ids"] else None))
        try:
            async for out in self._outputs(gen):
                timer.tokens(len(out.token_ids))
                last = out
                if out.finish_reason == "error":
                    yield api.sse(api.engine_error(out).body())
                    break
                yield api.sse(self._chunk(rid, created, out, options, splitter, chat))
        except TimeoutError:
            yield api.sse(api.error_body(f"request timed out after {self.config.limits.request_timeout_s} s",
                                         "timeout_error", code=504))
        except Exception as e:
            yield api.sse(api.error_body(f"{type(e).__name__}: {e}", "server_error", code=500))
        if last is not None and last.finish_reason != "error":
            timer.finish()
            if options["include_usage"]:
                yield api.sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": self.model, "choices": [], "usage": api.usage(last)})
        self.telemetry.count(200 if last is not None and last.finish_reason != "error" else 500)
        yield api.sse("[DONE]")

    def _chunk(self, rid: str, created: int, out: RequestOutput, options: dict[str, Any],
               splitter: api.ReasoningSplitter | None, chat: bool) -> dict[str, Any]:
        token_ids = out.token_ids if options["return_token_ids"] else None
        if not chat:
            logprobs = api.completion_logprobs(out.logprobs or [], self.prep.tokenizer) if options["logprobs"] else None
            return api.completion_chunk(rid, self.model, created, out.text, out.finish_reason, logprobs, token_ids)
        delta: dict[str, Any] = {}
        if splitter is None:
            delta["content"] = out.text
        else:
            reasoning, content = splitter.push(out.text)
            if out.finished:
                tail_r, tail_c = splitter.finish()
                reasoning, content = reasoning + tail_r, content + tail_c
            if reasoning:
                delta["reasoning_content"] = reasoning
            if content or not reasoning:
                delta["content"] = content
        logprobs = api.chat_logprobs(out.logprobs or [], self.prep.tokenizer) if options["logprobs"] else None
        return api.chat_chunk(rid, self.model, created, delta, out.finish_reason, logprobs, token_ids)

