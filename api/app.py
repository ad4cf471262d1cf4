"""`build_api`: the OpenAI-compatible HTTP API as a FastAPI app, from one ServingContext.

Besides the API it serves the web page (`/`: a chat playground and the expert view, plain files
from `api/web/` under `/ui`) and the expert view's data (`/experts`, `/experts/rebalance`).

Routes are thin: each endpoint family has its serving module (chat, completions, Baseten's
predict). In front of them `RequestGuard` checks the API key, the body's size and that it is a
JSON object, before any route runs, so every client error is OpenAI-shaped; the exception
handlers map the errors of the layers below to statuses. Nothing here knows about Ray: the
ingress deployment hosts this app with a router client, a test with an in-process engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.access_log import AccessLog, current
from api.context import ServingContext, text_size
from api.errors import APIError, EngineUnavailable
from api.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PredictRequest,
    PredictResponse,
    RebalanceResponse,
    ResponseObject,
    ResponsesRequest,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
    error_body,
    template_messages,
    validation_param,
)
from api.serving_chat import ServingChat
from api.serving_completion import ServingCompletion
from api.serving_predict import ServingPredict
from api.serving_responses import ServingResponses
from cluster.messages import ExpertStatus
from moe.errors import RequestError

log = logging.getLogger("ray.serve")
T = TypeVar("T")
VERSION = "0.1.0"
DOCS_ASSETS = "/static-offline-docs"  # fastapi-offline's Swagger UI and ReDoc files
WEB = Path(__file__).parent / "web"  # the web page's files (HTML, CSS, ES modules), under /ui
REBALANCE = "/experts/rebalance"
JSON_BODY_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
    "/predict",
    "/production/predict",
}
# When keys are set, every route needs one but these (matched on the path after root_path, as
# Starlette routes it): liveness, Prometheus, and static files (the web page, which then sends
# the key it is given on every call, and the API docs, which hold no data)
PUBLIC = {"/", "/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIXES = ("/ui/", DOCS_ASSETS + "/")
ADMIN = {REBALANCE}  # with --admin-api-key: only those keys (it reloads expert weights on the shards)
EXPERTS_CACHE_S = 1.0  # /experts asks every router and shard: one answer a second, however many ask
MAX_JSON_DEPTH = 128  # arrays and objects in a request body (a deep JSON schema has ~60)
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')  # an unclosed string runs to the end: linear time


OPENS, CLOSES = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


def too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text's arrays and objects nest deeper than `limit`, told without parsing
    it: brackets outside strings, counted in one vectorized pass (milliseconds for a 4 MB body
    of them); a body with no more opening brackets than the limit is not scanned at all."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    skeleton = np.frombuffer(JSON_STRING.sub(b"", raw), dtype=np.uint8)
    steps = np.isin(skeleton, OPENS).astype(np.int32) - np.isin(skeleton, CLOSES).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0)) > limit


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 503)
}


class CancelOnDisconnect:
    """ASGI middleware: a request whose client goes away is cancelled, so the engine stops
    generating for nobody (a stream stops by itself; a non-streaming answer would not, under
    uvicorn). The client's messages are read by one pump and handed to the route in order;
    when the pump reads `http.disconnect` before the route has answered, the route is
    cancelled (its choices abort their engine requests as they unwind). Behind Ray Serve the
    proxy cancels the request itself; this changes nothing there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def pump() -> None:
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    return

        route = asyncio.ensure_future(self.app(scope, inbox.get, send))
        reader = asyncio.ensure_future(pump())
        try:
            await asyncio.wait({route, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reader.cancel()
            if not route.done():  # the client left first
                route.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await route
        if not route.cancelled():
            route.result()  # the route's own exception, if it raised


class RequestGuard:
    """ASGI middleware: the API key (Bearer or Baseten's Api-Key), then the body: at most
    `max_body` bytes (with or without a truthful Content-Length) and a JSON object. The body is
    then replayed to the route as JSON, whatever Content-Type the client sent (curl -d sends a
    form type)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: list[str],
        max_body: int,
        on_error: Callable[[int], None],
        admin_keys: list[str] | None = None,
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.admin_keys = [k.encode() for k in admin_keys or []]  # for the admin routes, if set
        self.max_body = max_body
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = get_route_path(scope)  # behind a route_prefix or root_path: what the router matches
        try:
            if path in ADMIN and self.admin_keys:
                self._check_key(scope, self.admin_keys)
            elif self.keys and not (path in PUBLIC or path.startswith(PUBLIC_PREFIXES)):
                self._check_key(scope, self.keys)
            if scope["method"] == "POST" and path in JSON_BODY_PATHS:
                body = await self._read_json(scope, receive)
                scope, receive = self._replay(scope, body, receive)
        except APIError as e:
            self.on_error(e.status)
            return await JSONResponse(e.body, e.status, e.headers)(scope, receive, send)
        await self.app(scope, receive, send)

    @staticmethod
    def _check_key(scope: Scope, keys: list[bytes]) -> None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token_text = header.partition(" ")
        token = token_text.strip().encode() if scheme.lower() in ("bearer", "api-key") else b""
        if not any(hmac.compare_digest(token, k) for k in keys):
            raise APIError(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )

    async def _read_json(self, scope: Scope, receive: Receive) -> bytes:
        too_large = APIError(
            413,
            f"Request body is larger than {self.max_body} bytes.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        if int(dict(scope["headers"]).get(b"content-length", b"0") or 0) > self.max_body:
            raise too_large
        raw = bytearray()
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if len(raw) > self.max_body:
                raise too_large
            if not message.get("more_body", False):
                break
        if too_deep(bytes(raw)):  # told before json.loads recurses that deep
            raise APIError(
                400,
                f"Invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels.",
                "invalid_request_error",
                None,
                "invalid_json",
            )
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(
                400, f"Invalid JSON body: {e}", "invalid_request_error", None, "invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise APIError(
                400, "The request body must be a JSON object.", "invalid_request_error", None, "invalid_json"
            )
        record = current()
        if scope.get("raymix.log_prompts") and record is not None:  # the operator opted in
            record.prompt = data.get("messages", data.get("prompt"))
        return bytes(raw)

    @staticmethod
    def _replay(scope: Scope, body: bytes, receive_more: Receive) -> tuple[Scope, Receive]:
        """The body once, then the client's own messages (a disconnect, which ends a stream)."""
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive_more()

        return {**scope, "headers": headers}, receive


def cached(ttl_s: float, fetch: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """fetch(), shared: callers within ttl_s of the last answer get it, and callers while one
    is in flight wait for that one (an error is not kept)."""
    last: tuple[float, T] | None = None
    inflight: asyncio.Future[T] | None = None

    async def get() -> T:
        nonlocal last, inflight
        if last is not None and time.monotonic() - last[0] < ttl_s:
            return last[1]
        if inflight is None:
            inflight = asyncio.ensure_future(fetch())
        mine = inflight
        try:
            value = await asyncio.shield(mine)
        finally:
            if inflight is mine and mine.done():
                inflight = None
        last = (time.monotonic(), value)
        return value

    return get


def build_api(ctx: ServingContext, behind_serve_proxy: bool = False) -> FastAPI:
    """behind_serve_proxy: Ray Serve's proxy is in front (it sets and echoes X-Request-Id)."""
    s = ctx.settings
    app = FastAPIOffline(  # /docs and /redoc with their JS and CSS served from the package, no CDN
        title="raymix",
        description="OpenAI-compatible API for expert-parallel Mixtral serving",
        version=VERSION,
        static_url=DOCS_ASSETS,
    )
    app.add_middleware(CancelOnDisconnect)  # innermost: the routes see the body RequestGuard replays
    app.add_middleware(
        RequestGuard,
        keys=s.api_key,
        max_body=s.max_request_body_bytes,
        on_error=ctx.metrics.count_error,
        admin_keys=s.admin_api_key,
    )
    if s.cors_allow_origins:  # off unless configured; outside the guard, so preflights need no key
        app.add_middleware(
            CORSMiddleware, allow_origins=s.cors_allow_origins, allow_methods=["*"], allow_headers=["*"]
        )
    # outermost: every answer is logged
    app.add_middleware(AccessLog, log_prompts=s.access_log_prompts, echo_request_id=not behind_serve_proxy)
    _add_error_handlers(app, ctx)
    chat, completion, predict = ServingChat(ctx), ServingCompletion(ctx), ServingPredict(ctx)
    responses = ServingResponses(ctx)

    app.mount("/ui", StaticFiles(directory=WEB), name="ui")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The web page: a chat playground and a live view of the experts."""
        return FileResponse(WEB / "index.html")

    @app.get("/experts", response_model=ExpertStatus, responses=ERRORS)
    async def experts() -> ExpertStatus:
        """Where each expert is computed (replicas included), whether each shard answers and its
        round trip per layer, and the tokens per expert per layer over the recent window: the
        router's own counters, read by the web page's expert view."""
        try:
            return await expert_status()
        except Exception as e:  # the router is down or restarting
            raise EngineUnavailable(str(e) or type(e).__name__) from None

    expert_status = cached(EXPERTS_CACHE_S, lambda: asyncio.wait_for(ctx.engine.expert_status(), timeout=10))

    @app.post(REBALANCE, response_model=RebalanceResponse, responses=ERRORS)
    async def rebalance() -> dict[str, Any]:
        """Re-plan the hot-expert replicas from the recent load (EPLB) and move to the plan while
        serving; needs the API key when keys are set."""
        return RebalanceResponse(**dataclasses.asdict(await ctx.engine.rebalance())).body()

    @app.get("/health")
    async def health() -> Response:
        """200 when a router (the engine) has its model loaded and its shards connected."""
        try:
            stats = await asyncio.wait_for(ctx.engine.stats(), timeout=5)
        except Exception:  # the engine host is down, restarting or stuck
            return Response(status_code=503)
        return Response(status_code=200 if any(s.ready for s in stats) else 503)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> dict[str, Any]:
        return VersionResponse(
            version=VERSION, model_revision=ctx.revision, quantization=ctx.quantization
        ).body()

    async def card(name: str, created: int) -> ModelCard:
        try:  # the context length once the engine is up (null while it loads)
            max_len: int | None = await ctx.context_len()
        except (APIError, EngineUnavailable):
            max_len = None
        return ModelCard(
            id=name,
            created=created,
            root=ctx.names[0],
            max_model_len=max_len,
            revision=ctx.revision,
            quantization=ctx.quantization,
        )

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return ModelList(data=[await card(n, created) for n in ctx.names]).body()

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> dict[str, Any]:
        """One served model (OpenAI's `models.retrieve`); 404 model_not_found for another id."""
        return (await card(ctx.model_name(model_id), int(time.time()))).model_dump()

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, load = await asyncio.gather(ctx.engine.stats(), ctx.engine.expert_load())
        body, content_type = ctx.metrics.render(
            stats, load, {"model_name": ctx.names[0], "revision": ctx.revision or ""}
        )
        return Response(body, media_type=content_type)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        ctx.model_name(req.model)
        # off the event loop: a large input takes seconds, and other streams go on meanwhile
        if req.messages is not None:
            messages = template_messages(req.messages)
            tokens = await ctx.off_loop(text_size(req.messages), ctx.tokenizer.apply_chat_template, messages)
        elif req.prompt is not None:
            prompt, special = req.prompt, req.add_special_tokens
            tokens = await ctx.off_loop(
                len(prompt), lambda: ctx.tokenizer.encode(prompt, add_special_tokens=special)
            )
        else:
            raise APIError.bad_request("Either prompt or messages is required.", "prompt")
        return TokenizeResponse(
            tokens=tokens, count=len(tokens), max_model_len=await ctx.context_len()
        ).body()

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        ctx.model_name(req.model)
        vocab = ctx.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError.bad_request(f"token ids must be in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens)).body()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(req: ChatCompletionRequest) -> Response:
        return await chat.create(req)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(req: CompletionRequest) -> Response:
        return await completion.create(req)

    @app.post("/v1/responses", response_model=ResponseObject, responses=ERRORS)
    async def responses_create(req: ResponsesRequest) -> Response:
        """OpenAI's Responses API, stateless (nothing is stored; see api/serving_responses.py)."""
        return await responses.create(req)

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS)
    async def responses_retrieve(response_id: str) -> Response:
        raise APIError(
            404,
            f"No response with id '{response_id}': responses are not stored here (store is false).",
            "invalid_request_error",
            "response_id",
            "not_found",
        )

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS)
    @app.post("/production/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict_route(req: PredictRequest) -> Response:
        return await predict.create(req)

    return app


def _add_error_handlers(app: FastAPI, ctx: ServingContext) -> None:
    def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
        ctx.metrics.count_error(status)
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return answer(e.status, e.body, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Routing's own errors (no such path, a wrong method) in OpenAI's shape, as OpenAI words
        them ("Invalid URL (GET /v1/foo)")."""
        route = f"{request.method} {request.url.path}"
        message = f"Invalid URL ({route})" if e.status_code == 404 else f"{e.detail} ({route})"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return answer(
            e.status_code, error_body(message, "invalid_request_error", None, code), dict(e.headers or {})
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        param, msg = validation_param(e.errors())
        return answer(400, error_body(msg, "invalid_request_error", param))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return answer(400, APIError.from_request_error(e).body)

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(_: Request, e: EngineUnavailable) -> JSONResponse:
        return answer(503, error_body(f"The model is unavailable: {e}", "service_unavailable"))

    @app.exception_handler(Exception)
    async def _server_error(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return answer(500, error_body("internal server error", "server_error"))
