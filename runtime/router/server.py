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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from runtime import __version__ as RUNTIME_VERSION
from runtime import logs, serve_compat
from runtime.config import AppConfig
from runtime.errors import RequestError
from runtime.protocol import GenerateRequest, RequestOutput
from runtime.requests import (
    ResponseOptions,
    check_fields,
    parse_chat_request,
    parse_completion_request,
    parse_count,
    parse_prompts,
    parse_response_options,
)
from runtime.requests import parse_flag as _flag
from runtime.router import admin, generate_api
from runtime.router import openai_api as api
from runtime.router.assistant import AssistantStream, ToolUse
from runtime.router.fetch import ImageFetcher
from runtime.router.metrics import RequestTimer, RouterMetrics, prometheus_text
from runtime.router.prepare import RequestPreparer
from runtime.stats_board import board

log = logging.getLogger(__name__)

http = FastAPI(title="kimi-runtime", docs_url=None, redoc_url=None)


@http.exception_handler(HTTPException)
async def _openai_http_error(request: Request, exc: HTTPException) -> Response:
    """Unknown routes and methods answer with an OpenAI error body, like every other error."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(api.error_body(message, kind, code=exc.status_code), exc.status_code)


# Module-level helpers go above the deployment class: Serve pickles the class when it is decorated.


class _LMFailed(Exception):
    """The LM stream failed; `retryable`: before it produced anything (another replica may serve it)."""

    def __init__(self, retryable: bool):
        super().__init__("the LM replica failed " + ("before answering" if retryable else "while answering"))
        self.retryable = retryable


def _internal_error(request_id: str, e: BaseException) -> api.ApiError:
    """Serving failed on our side: the traceback goes to the router's log, and the client hears what
    failed and the request id that finds it there, never the exception's own text."""
    log.error("%s: failed", request_id, exc_info=e)
    what = "the LM replica serving it failed" if isinstance(e, _LMFailed) else "the router failed"
    return api.ApiError(500, f"request {request_id} failed: {what}; the server's log has the details",
                        "server_error")


@dataclasses.dataclass
class _Plan:
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


def _fan_out(gen: GenerateRequest, n: int) -> list[GenerateRequest]:
    """n choices of one prompt: their own request ids, and seed + index as each one's seed."""
    if n == 1:
        return [gen]
    seed = gen.sampling.seed
    return [msgspec.structs.replace(gen, request_id=f"{gen.request_id}-{i}", sampling=msgspec.structs.replace(
        gen.sampling, seed=None if seed is None else (seed + i) % 2**64 if i else seed)) for i in range(n)]


class _ChoiceStream:
    """Per-choice state of a streamed answer."""

    def __init__(self, assistant: AssistantStream | None, echo: api.Echo | None):
        self.assistant = assistant  # chat: the reasoning and tool-call parsers of this choice
        self.echo = echo  # sent with the first chunk, then None
        self.offset = 0  # characters of this choice's text sent so far (completions' text_offset)
        self.last: RequestOutput | None = None


@serve.deployment(name="Router", max_ongoing_requests=1024)  # CPUs and placement: AppConfig.router_options
@serve.ingress(http)
class Router:
    def __init__(self, config: dict[str, Any], model_dir: str, lm: Any, vision: Any):
        self.config = AppConfig.model_validate(config)
        logs.to_serve(self.config.log_level)
        serve_compat.apply_in_replica()
        self.model = self.config.name
        self.model_dir = model_dir
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
        self.weights_version = 0  # the newest LM weights version seen (runtime.router.admin)
        self.admin = admin.AdminFanOut(lm, self.board, self.config.admin.timeout_s, model_dir)
        self._pool_state: tuple[float, dict[str, Any]] = (0.0, {})  # (when read, the board's admin state)
        log.info("router ready: model %s served as %s, at most %d requests in flight, timeout %s s, API key %s, "
                 "admin endpoints %s", model_dir, self.config.served_names, self.config.limits.max_queued_requests,
                 self.config.limits.request_timeout_s, "on" if self.config.api_key else "off",
                 "on" if self.config.admin.enabled else "off")

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
        return JSONResponse({"object": "list", "data": [self._card(name) for name in self.config.served_names]})

    @http.get("/v1/models/{model_id:path}")
    async def model_card(self, model_id: str, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if not self.config.serves(model_id):
            return self._error(self._unknown_model(model_id))
        return JSONResponse(self._card(model_id))

    def _card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "kimi-runtime", "root": self.model_dir,
                "max_model_len": self.prep.model_config.text.max_position_embeddings}

    def _unknown_model(self, name: Any) -> api.ApiError:
        return api.ApiError(404, f"The model {name!r} does not exist; this server serves "
                                 f"{', '.join(map(repr, self.config.served_names))}", "not_found_error", "model")

    @http.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: a prompt, or chat messages rendered (images expanded) as a chat request is."""
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = await self._json_body(request)
            check_fields(body, "tokenize")
            ids, prompt = await self._tokenize(body)
        except RequestError as e:
            return self._error(api.ApiError(400, str(e), "invalid_request_error", e.field))
        except api.ApiError as e:
            return self._error(e)
        strs = [self.prep.tokenizer.decode([t]) for t in ids] if _flag(body, "return_token_strs") else None
        return JSONResponse({"count": len(ids), "max_model_len": self.prep.model_config.text.max_position_embeddings,
                             "tokens": ids, "token_strs": strs} | ({"prompt": prompt} if prompt else {}))

    async def _tokenize(self, body: dict[str, Any]) -> tuple[list[int], str | None]:
        if ("messages" in body) == ("prompt" in body):
            raise RequestError("give exactly one of prompt or messages", "prompt")
        if "prompt" in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str):
                raise RequestError("prompt must be a string", "prompt")
            special = body.get("add_special_tokens", True)
            return list(self.prep.tokenizer(prompt, add_special_tokens=bool(special))["input_ids"]), None
        chat = parse_chat_request({k: v for k, v in body.items() if k != "add_generation_prompt"},
                                  self.prep.defaults.sampling, self.limits)
        if chat.image_urls:
            chat = dataclasses.replace(chat, images=await self.fetcher.fill(chat.images, chat.image_urls),
                                       image_urls=())
        gen = await asyncio.to_thread(self.prep.prepare, "tokenize", chat)
        return gen.prompt_ids, None

    @http.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = await self._json_body(request)
            check_fields(body, "detokenize")
            tokens = parse_prompts(body.get("tokens"), self.prep.model_config.text.vocab_size, "tokens")
            if len(tokens) != 1 or not isinstance(tokens[0], list):
                raise RequestError("tokens must be a non-empty list of token ids", "tokens")
        except RequestError as e:
            return self._error(api.ApiError(400, str(e), "invalid_request_error", e.field))
        except api.ApiError as e:
            return self._error(e)
        return JSONResponse({"prompt": self.prep.tokenizer.decode(tokens[0])})

    @http.get("/version")
    async def version(self) -> Response:
        return JSONResponse({"version": RUNTIME_VERSION})

    @http.get("/health")
    async def health(self) -> Response:
        try:
            await asyncio.wait_for(asyncio.gather(self.lm.ping.remote(), self.vision.ping.remote()), 5.0)
        except Exception as e:
            log.warning("health check failed", exc_info=True)
            return JSONResponse(api.error_body(f"not ready: {type(e).__name__}", "service_unavailable"), 503)
        return JSONResponse({"status": "ok"})

    @http.get("/stats")
    async def stats(self) -> Response:
        return JSONResponse(await self._stats())

    @http.get("/metrics")
    async def metrics(self) -> Response:
        text = prometheus_text(await self._stats(), self.model)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _stats(self) -> dict[str, Any]:
        pools = await self.board.snapshot.remote()
        return {"router": self.telemetry.snapshot(self._in_flight), "lm": pools.get("lm", {}),
                "vision": pools.get("vision", {})}

    # --- one request ---------------------------------------------------------------------------

    async def _serve(self, request: Request, prepare: Callable[[dict[str, Any]], Awaitable[_Plan]],
                     chat: bool) -> Response:
        timer = self.telemetry.timer()
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = await self._json_body(request)
            plan = await prepare(body)
        except RequestError as e:
            return self._error(api.ApiError(400, str(e), "invalid_request_error", e.field))
        except api.ApiError as e:
            return self._error(e)
        if self.config.admin.enabled and (await self._pool_state_now()).get("sleep_level"):
            return self._error(api.ApiError(503, "the LM pool is asleep (POST /admin/wake brings it back)",
                                            "service_unavailable", headers={"Retry-After": "5"}))
        if self._in_flight >= self.config.limits.max_queued_requests:
            return self._error(api.ApiError(429, "too many requests in flight; retry shortly", "rate_limit_error",
                                            headers={"Retry-After": "1"}))
        if plan.generate is not None:  # SGLang's /generate answers in its own shapes
            return await self._generate_answer(plan, plan.generate, timer)
        if plan.options.stream:
            return StreamingResponse(self._sse(plan, chat, timer), media_type="text/event-stream",
                                     headers=self._version_header())
        return await self._whole(plan, chat, timer)

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
        if model is not None and not (isinstance(model, str) and self.config.serves(model)):
            raise self._unknown_model(model)
        return body

    def _error(self, error: api.ApiError) -> Response:
        self.telemetry.count(error.status)
        return JSONResponse(error.body(), error.status, headers=error.headers)

    def _timed_out(self, request_id: str) -> api.ApiError:
        timeout = self.config.limits.request_timeout_s
        log.warning("%s: timed out after %s s", request_id, timeout)
        return api.ApiError(504, f"request timed out after {timeout} s", "timeout_error")

    # --- preparing -----------------------------------------------------------------------------

    async def _prepare_chat(self, body: dict[str, Any]) -> _Plan:
        check_fields(body, "chat")
        chat = parse_chat_request(body, self.prep.defaults.sampling, self.limits)
        n = parse_count(body)
        if chat.image_urls:
            chat = dataclasses.replace(chat, images=await self.fetcher.fill(chat.images, chat.image_urls),
                                       image_urls=())
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = await asyncio.to_thread(self.prep.prepare, rid, chat)  # hashing and tokenizing: off the loop
        return _Plan(rid, _fan_out(gen, n), n, parse_response_options(body, chat.sampling), [None] * n,
                     reasoning=api.starts_in_reasoning(gen.prompt_ids, self.think_ids), tools=ToolUse.of(chat))

    async def _prepare_completion(self, body: dict[str, Any]) -> _Plan:
        req = parse_completion_request(body, self.prep.defaults.sampling, self.limits,
                                       self.prep.model_config.text.vocab_size)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens: list[GenerateRequest] = []
        echoes: list[api.Echo | None] = []
        for i, prompt in enumerate(req.prompts):
            ids = self._completion_ids(prompt)
            gen_id = rid if len(req.prompts) == 1 else f"{rid}-p{i}"
            gens += _fan_out(GenerateRequest(gen_id, ids, req.sampling), req.n)
            text = prompt if isinstance(prompt, str) else self.prep.tokenizer.decode(ids, skip_special_tokens=False)
            echoes += [api.Echo(text, ids) if req.echo else None] * req.n
        return _Plan(rid, gens, req.n, req.options, echoes)

    def _completion_ids(self, prompt: str | list[int], field: str = "prompt") -> list[int]:
        ids = list(self.prep.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else list(prompt)
        if isinstance(prompt, list) and self.prep.model_config.image_token_id in ids:
            raise RequestError(f"{field} token ids must not contain the image placeholder id", field)
        limit = self.prep.model_config.text.max_position_embeddings
        if len(ids) >= limit:
            raise RequestError(f"{field} is {len(ids)} tokens; the model's context is {limit} tokens", field)
        return ids

    # --- SGLang's /generate (runtime.router.generate_api) ----------------------------------------

    @http.post("/generate")
    async def generate(self, request: Request) -> Response:
        return await self._serve(request, self._prepare_generate, chat=False)

    async def _prepare_generate(self, body: dict[str, Any]) -> _Plan:
        gen = generate_api.parse_generate(body, self.prep.defaults.sampling, self.limits,
                                          self.prep.model_config.text.vocab_size)
        rid = gen.rid or uuid.uuid4().hex
        ids = generate_api.sample_ids(rid, len(gen.prompts), gen.n)
        gens: list[GenerateRequest] = []
        for i, prompt in enumerate(gen.prompts):
            first = GenerateRequest(ids[i * gen.n], self._completion_ids(prompt, gen.field),
                                    gen.sampling)
            gens += [msgspec.structs.replace(g, request_id=ids[i * gen.n + j])
                     for j, g in enumerate(_fan_out(first, gen.n))]
        return _Plan(rid, gens, gen.n, ResponseOptions(stream=gen.stream), [None] * len(gens), generate=gen)

    async def _generate_answer(self, plan: _Plan, gen: generate_api.GenerateBody, timer: RequestTimer) -> Response:
        if gen.stream:
            return StreamingResponse(self._generate_sse(plan, gen, timer), media_type="text/event-stream",
                                     headers=self._version_header())
        dones = await self._gather(plan, timer)
        if isinstance(dones, Response):
            return dones
        answers = [generate_api.answer(g.request_id, d.text, d.token_ids, d.logprobs, d.last, gen,
                                       d.last.weights_version) for g, d in zip(plan.gens, dones, strict=True)
                   if d.last is not None]
        one = len(answers) == 1 and not gen.batched
        return JSONResponse(answers[0] if one else answers, headers=self._version_header(dones))

    async def _generate_sse(self, plan: _Plan, gen: generate_api.GenerateBody,
                            timer: RequestTimer) -> AsyncIterator[bytes]:
        """Each event: one sample's whole answer so far (SGLang's default), with its index when several."""
        dones = [api.Completion() for _ in plan.gens]
        many = len(plan.gens) > 1 or gen.batched
        failed = False
        try:
            async for index, out in self._merged(plan):
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
        except TimeoutError:
            failed = True
            yield api.sse(self._timed_out(plan.request_id).body())
        except Exception as e:
            failed = True
            yield api.sse(_internal_error(plan.request_id, e).body())
        if not failed:
            timer.finish()
        self.telemetry.count(500 if failed else 200)
        yield api.sse("[DONE]")

    def _version_header(self, dones: list[api.Completion] | None = None) -> dict[str, str]:
        """x-weights-version: the version that answered (a stream's headers go before its first
        output: there, the newest version this router has seen)."""
        versions = [d.last.weights_version for d in dones or [] if d.last is not None]
        self.weights_version = max([self.weights_version, *versions])
        return {"x-weights-version": str(max(versions) if versions else self.weights_version)}

    # --- admin (runtime.router.admin) ----------------------------------------------------------

    @http.post("/admin/abort")
    async def admin_abort(self, request: Request) -> Response:
        return await self._admin(request, lambda body: self.admin.run(admin.parse_abort(body)))

    @http.post("/admin/sleep")
    async def admin_sleep(self, request: Request) -> Response:
        return await self._admin(request, lambda body: self.admin.run(admin.parse_sleep(body)), sleeping=True)

    @http.post("/admin/wake")
    async def admin_wake(self, request: Request) -> Response:
        return await self._admin(request, lambda body: self.admin.run(admin.parse_wake(body)), sleeping=False)

    @http.post("/admin/update_weights")
    async def admin_update_weights(self, request: Request) -> Response:
        return await self._admin(request, self.admin.update_weights)

    async def _admin(self, request: Request, run: Any, sleeping: bool | None = None) -> Response:
        """Off (404) unless admin.enabled; 403 without the API key; then every LM replica runs it."""
        if not self.config.admin.enabled:
            return self._error(api.ApiError(404, "the admin endpoints are off (admin.enabled: true in the app "
                                                 "config turns them on)", "not_found_error"))
        if request.headers.get("authorization", "") != f"Bearer {self.config.api_key}":
            return self._error(api.ApiError(403, "the admin endpoints need the API key (Authorization: Bearer ...)",
                                            "permission_error"))
        try:
            body = await self._json_body(request) if int(request.headers.get("content-length") or 0) else {}
            outcome: admin.Outcome = await run(body)
        except RequestError as e:
            return self._error(api.ApiError(400, str(e), "invalid_request_error", e.field))
        except api.ApiError as e:
            return self._error(e)
        if not outcome.results:
            return self._error(api.ApiError(503, "no LM replica is running", "service_unavailable"))
        if not outcome.ok:
            log.warning("admin %s failed: %s", request.url.path, outcome.first_error())
            error = api.kind_error(outcome.error_kind(), outcome.first_error())
            return JSONResponse(error.body() | outcome.body(), error.status)
        if sleeping is not None:
            level = max(r.sleep_level for r in outcome.results) if sleeping else 0
            await self.board.set_admin_state.remote({"sleep_level": level})
        self._pool_state = (0.0, {})
        self.weights_version = max([self.weights_version, *(r.weights_version for r in outcome.results)])
        return JSONResponse(outcome.body() | {"weights_version": self.weights_version},
                            headers={"x-weights-version": str(self.weights_version)})

    async def _pool_state_now(self, max_age_s: float = 0.5) -> dict[str, Any]:
        """The board's admin state, read at most every max_age_s (every router sees another's sleep)."""
        at, state = self._pool_state
        if time.monotonic() - at > max_age_s:
            state = await self.board.admin_state.remote()
            self._pool_state = (time.monotonic(), state)
        return state

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
                    except _LMFailed as e:
                        if attempt == 1 or not e.retryable:
                            raise
                        log.warning("%s: the LM replica failed before answering; trying again", gen.request_id,
                                    exc_info=True)
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
            raise _LMFailed(retryable=not produced) from e
        finally:
            stream.cancel()  # a no-op when it finished; otherwise the LM replica aborts the request

    async def _merged(self, plan: _Plan) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) of every choice as they come. A prompt's later choices start once
        its first choice has produced its first output: its prompt is then in the prefix cache."""
        if len(plan.gens) == 1:
            async for out in self._outputs(plan.gens[0]):
                yield 0, out
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        started = [asyncio.Event() for _ in plan.gens]

        async def pump(index: int) -> None:
            try:
                if (leader := plan.leader(index)) is not None:
                    await started[leader].wait()
                async for out in self._outputs(plan.gens[index]):
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

    async def _gather(self, plan: _Plan, timer: RequestTimer) -> list[api.Completion] | Response:
        """Every choice's whole answer, or the error response that ends the request."""
        dones = [api.Completion() for _ in plan.gens]
        try:
            async for index, out in self._merged(plan):
                timer.tokens(len(out.token_ids))
                dones[index].add(out)
        except TimeoutError:
            return self._error(self._timed_out(plan.request_id))
        except Exception as e:
            return self._error(_internal_error(plan.request_id, e))
        for done in dones:
            assert done.last is not None
            if done.last.finish_reason == "error":
                return self._error(api.engine_error(done.last))
        timer.finish()
        self.telemetry.count(200)
        return dones

    async def _whole(self, plan: _Plan, chat: bool, timer: RequestTimer) -> Response:
        dones = await self._gather(plan, timer)
        if isinstance(dones, Response):
            return dones
        opts, tok = plan.options, self.prep.tokenizer
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
        return JSONResponse(body, headers=self._version_header(dones))

    async def _sse(self, plan: _Plan, chat: bool, timer: RequestTimer) -> AsyncIterator[bytes]:
        rid, created, opts = plan.request_id, int(time.time()), plan.options
        streams = [_ChoiceStream(AssistantStream(plan.reasoning, plan.tools) if chat else None, echo)
                   for echo in plan.echoes]
        failed, roles_sent = False, not chat
        try:
            async for index, out in self._merged(plan):
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
        except TimeoutError:
            failed = True
            yield api.sse(self._timed_out(plan.request_id).body())
        except Exception as e:
            failed = True
            yield api.sse(_internal_error(plan.request_id, e).body())
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
        logprobs = api.chat_logprobs(out.logprobs or [], self.prep.tokenizer) if options.logprobs else None
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
                                               self.prep.tokenizer, options.skip_special_tokens, stream.offset)
        stream.offset += len(text)
        return api.completion_chunk(rid, self.model, created, text, out.finish_reason, logprobs, token_ids, index)
