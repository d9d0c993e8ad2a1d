"""The HTTP front door: an OpenAI-compatible FastAPI ingress on Ray Serve.

The Router deployment owns the endpoints, the API key, reading the body and each endpoint's
preparing: it validates a request, renders and tokenizes it (RequestPreparer) into a Plan, and hands
the plan on. It holds no tensors. Running the plan against the LM pool is runtime.router.lm_streams';
shaping its outputs into the answer (JSON, SSE, SGLang's shapes) is runtime.router.answers'.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotations
# of the methods Serve wraps.

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from runtime import __version__ as RUNTIME_VERSION
from runtime import logs, serve_compat
from runtime.config import AppConfig
from runtime.errors import RequestError
from runtime.node_address import node_ip
from runtime.protocol import GenerateRequest
from runtime.requests import (
    ChatRequest,
    ResponseOptions,
    TokenizeRequest,
    check_fields,
    parse_chat_request,
    parse_completion_request,
    parse_count,
    parse_detokenize_request,
    parse_response_options,
    parse_tokenize_request,
)
from runtime.router import admin, generate_api
from runtime.router import openai_api as api
from runtime.router.answers import Answers, WeightsSeen
from runtime.router.assistant import ToolUse
from runtime.router.fetch import ImageFetcher
from runtime.router.lm_streams import LMStreams, Plan, fan_out
from runtime.router.metrics import RouterMetrics, prometheus_text
from runtime.router.prepare import RequestPreparer
from runtime.router.token_inbox import TokenInbox
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
        self.inbox = TokenInbox(node_ip())  # engine cores push this router's outputs here
        self.streams = LMStreams(lm, self.config.limits.request_timeout_s, self.inbox)
        self.weights = WeightsSeen()  # also moved by the admin endpoints (runtime.router.admin)
        self.answers = Answers(self.streams, self.model, self.prep.tokenizer, self.telemetry, self.weights)
        self.admin = admin.AdminFanOut(lm, self.board, self.config.admin.timeout_s, model_dir)
        self._pool_state: tuple[float, dict[str, Any]] = (0.0, {})  # (when read, the board's admin state)
        log.info("router ready: model %s served as %s, at most %d requests in flight, timeout %s s, API key %s, "
                 "admin endpoints %s, tokens arrive at %s", model_dir, self.config.served_names,
                 self.config.limits.max_queued_requests, self.config.limits.request_timeout_s,
                 "on" if self.config.api_key else "off", "on" if self.config.admin.enabled else "off",
                 self.inbox.address)

    def __del__(self) -> None:
        self.inbox.close()

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
            req = parse_tokenize_request(await self._json_body(request), self.prep.defaults.sampling, self.limits)
            ids = await self._tokenize(req)
        except (RequestError, api.ApiError) as e:
            return self._refused(e)
        strs = [self.prep.tokenizer.decode([t]) for t in ids] if req.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": self.prep.model_config.text.max_position_embeddings,
                             "tokens": ids, "token_strs": strs})

    async def _tokenize(self, req: TokenizeRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return list(self.prep.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        gen = await asyncio.to_thread(self.prep.prepare, "tokenize", await self._fetched(req.prompt))
        return gen.prompt_ids

    @http.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            tokens = parse_detokenize_request(await self._json_body(request), self.prep.model_config.text.vocab_size)
        except (RequestError, api.ApiError) as e:
            return self._refused(e)
        return JSONResponse({"prompt": self.prep.tokenizer.decode(tokens)})

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
        return {"router": self.telemetry.snapshot(self.streams.in_flight), "lm": pools.get("lm", {}),
                "vision": pools.get("vision", {})}

    # --- one request ---------------------------------------------------------------------------

    async def _serve(self, request: Request, prepare: Callable[[dict[str, Any]], Awaitable[Plan]],
                     chat: bool) -> Response:
        timer = self.telemetry.timer()
        try:
            if (denied := self._auth(request)) is not None:
                return denied
            body = await self._json_body(request)
            plan = await prepare(body)
        except (RequestError, api.ApiError) as e:
            return self._refused(e)
        if self.config.admin.enabled and (await self._pool_state_now()).get("sleep_level"):
            return self._error(api.ApiError(503, "the LM pool is asleep (POST /admin/wake brings it back)",
                                            "service_unavailable", headers={"Retry-After": "5"}))
        if self.streams.in_flight >= self.config.limits.max_queued_requests:
            return self._error(api.ApiError(429, "too many requests in flight; retry shortly", "rate_limit_error",
                                            headers={"Retry-After": "1"}))
        return await self.answers.respond(plan, chat, timer)

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
        return self.answers.error(error)

    def _refused(self, e: RequestError | api.ApiError) -> Response:
        """A request refused before it runs; a RequestError is a 400 naming its field."""
        if isinstance(e, RequestError):
            e = api.ApiError(400, str(e), "invalid_request_error", e.field)
        return self._error(e)

    # --- preparing -----------------------------------------------------------------------------

    async def _prepare_chat(self, body: dict[str, Any]) -> Plan:
        check_fields(body, "chat")
        chat = parse_chat_request(body, self.prep.defaults.sampling, self.limits)
        n = parse_count(body)
        chat = await self._fetched(chat)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        gen = await asyncio.to_thread(self.prep.prepare, rid, chat)  # hashing and tokenizing: off the loop
        return Plan(rid, fan_out(gen, n), n, parse_response_options(body, chat.sampling), [None] * n,
                     reasoning=api.starts_in_reasoning(gen.prompt_ids, self.think_ids), tools=ToolUse.of(chat))

    async def _fetched(self, chat: ChatRequest) -> ChatRequest:
        """The request with its http(s) images fetched (runtime.router.fetch; off unless allowed)."""
        if not chat.image_urls:
            return chat
        return dataclasses.replace(chat, images=await self.fetcher.fill(chat.images, chat.image_urls), image_urls=())

    async def _prepare_completion(self, body: dict[str, Any]) -> Plan:
        req = parse_completion_request(body, self.prep.defaults.sampling, self.limits,
                                       self.prep.model_config.text.vocab_size)
        rid = f"cmpl-{uuid.uuid4().hex}"
        gens: list[GenerateRequest] = []
        echoes: list[api.Echo | None] = []
        for i, prompt in enumerate(req.prompts):
            ids = self._completion_ids(prompt)
            gen_id = rid if len(req.prompts) == 1 else f"{rid}-p{i}"
            gens += fan_out(GenerateRequest(gen_id, ids, req.sampling), req.n)
            text = prompt if isinstance(prompt, str) else self.prep.tokenizer.decode(ids, skip_special_tokens=False)
            echoes += [api.Echo(text, ids) if req.echo else None] * req.n
        return Plan(rid, gens, req.n, req.options, echoes)

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

    async def _prepare_generate(self, body: dict[str, Any]) -> Plan:
        gen = generate_api.parse_generate(body, self.prep.defaults.sampling, self.limits,
                                          self.prep.model_config.text.vocab_size)
        rid = gen.rid or uuid.uuid4().hex
        ids = generate_api.sample_ids(rid, len(gen.prompts), gen.n)
        gens: list[GenerateRequest] = []
        for i, prompt in enumerate(gen.prompts):
            first = GenerateRequest(ids[i * gen.n], self._completion_ids(prompt, gen.field),
                                    gen.sampling)
            gens += [msgspec.structs.replace(g, request_id=ids[i * gen.n + j])
                     for j, g in enumerate(fan_out(first, gen.n))]
        return Plan(rid, gens, gen.n, ResponseOptions(stream=gen.stream), [None] * len(gens), generate=gen)

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
        except (RequestError, api.ApiError) as e:
            return self._refused(e)
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
        version = self.weights.saw(r.weights_version for r in outcome.results)
        return JSONResponse(outcome.body() | {"weights_version": version}, headers={"x-weights-version": str(version)})

    async def _pool_state_now(self, max_age_s: float = 0.5) -> dict[str, Any]:
        """The board's admin state, read at most every max_age_s (every router sees another's sleep)."""
        at, state = self._pool_state
        if time.monotonic() - at > max_age_s:
            state = await self.board.admin_state.remote()
            self._pool_state = (time.monotonic(), state)
        return state
