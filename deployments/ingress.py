"""Ingress: the OpenAI-compatible HTTP API (FastAPI inside a Ray Serve deployment).

It validates requests, applies the chat template, tokenizes, and forwards each choice to the
router as one streaming call; outputs come back one engine step at a time and leave as JSON or
as Server-Sent Events (sse-starlette). Errors are OpenAI-shaped. A client that goes away
mid-stream has its requests aborted in the router, which frees their KV blocks.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from sse_starlette.sse import EventSourceResponse

from cluster.config import RaymixSettings
from deployments.channel import RouterChannel, RouterGone
from deployments.metrics import ServingMetrics
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    PredictRequest,
    SamplingFields,
    TokenizeRequest,
    error_body,
    validation_param,
)
from deployments.tool_calls import ChatPlan, parse_tool_calls, plan_chat
from moe.errors import RequestError
from moe.generation import generation_defaults
from moe.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")
app = FastAPI(title="raymix", description="OpenAI-compatible API for expert-parallel Mixtral serving")
VERSION = "0.1.0"
OPEN_PATHS = {"/health", "/version", "/metrics"}


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def bad_request(e: RequestError) -> HTTPError:
    return HTTPError(400, e.message, "invalid_request_error", e.param, e.code)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def collect(
    outputs: AsyncIterator[tuple[int, dict[str, Any]]], n: int, first_tokens: list[int | None] | None = None
) -> tuple[list, list, list, int]:
    """A non-streaming answer: per choice its text, finish reason and logprobs; total tokens.
    `first_tokens`, when given, receives each choice's first output token."""
    texts, reasons = [""] * n, [None] * n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    completion_tokens = 0
    async for i, out in outputs:
        if first_tokens is not None and first_tokens[i] is None and out["new_token_ids"]:
            first_tokens[i] = out["new_token_ids"][0]
        texts[i] += out["new_text"]
        logprobs[i] += out["new_logprobs"]
        if out["finished"]:
            reasons[i] = out["finish_reason"]
            completion_tokens += out["num_output_tokens"]
    return texts, reasons, logprobs, completion_tokens


async def _no_more() -> AsyncIterator[dict[str, Any]]:
    return
    yield


def _empty_output(prompt_tokens: int) -> dict[str, Any]:
    """The one output of a request for zero tokens: finished at once, by length."""
    return {
        "new_token_ids": [],
        "new_text": "",
        "new_logprobs": [],
        "finished": True,
        "finish_reason": "length",
        "num_prompt_tokens": prompt_tokens,
        "num_output_tokens": 0,
    }


def stream_chunk(
    rid: str,
    obj: str,
    created: int,
    model: str,
    include_usage: bool,
    choices: list[dict[str, Any]],
    **extra: Any,
) -> str:
    """One SSE event's JSON; with include_usage every chunk carries "usage" (null until the last)."""
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if include_usage:
        body["usage"] = None
    return json.dumps(body | extra)


METRICS: list[ServingMetrics] = []  # the replica's metrics, once its Ingress is built


def count_error(status: int) -> None:
    for m in METRICS:
        m.count_error(status)


BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/predict": PredictRequest,
    "/production/predict": PredictRequest,
}


def openapi() -> dict[str, Any]:
    """FastAPI's document plus the request bodies (the endpoints read their bodies themselves,
    to answer malformed JSON and oversized bodies the OpenAI way)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=VERSION, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    app.openapi_schema = doc
    return doc


app.openapi = openapi  # type: ignore[method-assign]


@app.exception_handler(HTTPError)
async def _http_error(_: Request, e: HTTPError) -> JSONResponse:
    count_error(e.status)
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


@app.exception_handler(RouterGone)
async def _router_gone(_: Request, e: RouterGone) -> JSONResponse:
    count_error(503)
    return JSONResponse(error_body(f"The model is unavailable: {e}", "service_unavailable"), status_code=503)


@app.exception_handler(RequestError)
async def _request_error(_: Request, e: RequestError) -> JSONResponse:
    count_error(400)
    return JSONResponse(bad_request(e).body, status_code=400)


@app.exception_handler(Exception)
async def _server_error(_: Request, e: Exception) -> JSONResponse:
    count_error(500)
    log.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict[str, Any], router: Any):
        self.settings = s = RaymixSettings(**settings)
        self.router = router
        self.channel = RouterChannel(router)
        if s.cors_allow_origins:  # off unless configured
            app.add_middleware(
                CORSMiddleware, allow_origins=s.cors_allow_origins, allow_methods=["*"], allow_headers=["*"]
            )
        self.names = s.model_names()
        self.tokenizer = load_tokenizer(s.model_dir(), s.tokenizer_mode)
        self.defaults = generation_defaults(s.model_dir(), s.generation_config, s.override_generation_config)
        self.keys = [k.encode() for k in s.api_key]
        self.serving_metrics = ServingMetrics(ray_export=True)
        METRICS[:] = [self.serving_metrics]
        self.max_model_len: int | None = None

    def __del__(self) -> None:
        self.channel.close()

    # ---- plumbing ----

    def _check_auth(self, request: Request) -> None:
        if not self.keys or request.url.path in OPEN_PATHS:
            return
        scheme, _, token_text = request.headers.get("authorization", "").partition(" ")
        token = token_text.strip().encode() if scheme.lower() in ("bearer", "api-key") else b""
        if not any(hmac.compare_digest(token, k) for k in self.keys):
            raise HTTPError(
                401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key"
            )

    async def _body(self, request: Request, model_cls: type[BaseModel]) -> Any:
        self._check_auth(request)
        limit = self.settings.max_request_body_bytes
        too_large = HTTPError(
            413,
            f"Request body is larger than {limit} bytes.",
            "invalid_request_error",
            None,
            "request_too_large",
        )
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():  # a body without (or lying about) Content-Length
            raw += chunk
            if len(raw) > limit:
                raise too_large
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(
                400, f"Invalid JSON body: {e}", "invalid_request_error", None, "invalid_json"
            ) from None
        if not isinstance(data, dict):
            raise HTTPError(
                400, "The request body must be a JSON object.", "invalid_request_error", None, "invalid_json"
            )
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            param, msg = validation_param(e)
            raise HTTPError(400, msg, "invalid_request_error", param, None) from None

    def _model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.names:
            return requested or self.names[0]
        raise HTTPError(
            404,
            f"The model `{requested}` does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    async def _context_len(self) -> int:
        if self.max_model_len is None:
            try:
                info = await asyncio.wait_for(self.router.model_info.remote(), timeout=30)
            except Exception as e:
                raise RouterGone(str(e) or type(e).__name__) from None
            if not info["ready"]:
                raise HTTPError(503, "The model is still loading.", "service_unavailable")
            self.max_model_len = info["max_model_len"]
        return self.max_model_len  # type: ignore[return-value]

    async def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The request's max tokens, else the checkpoint's max_new_tokens, else up to the context."""
        if requested is not None:
            return requested
        room = max(1, await self._context_len() - prompt_len)
        return min(room, int(self.defaults.get("max_new_tokens", room)))

    async def _start(
        self,
        rid: str,
        prompts: list[list[int]],
        req: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        plan: ChatPlan | None = None,
    ):
        """Submit one router request per choice (choice i: prompts[i], seed + i) and wait for each
        one's first output, where refusals show. → [(output iterator, first output)] per choice."""
        if max_tokens == 0:  # nothing to generate (DeepInfra allows it): answer without the engine
            ctx = await self._context_len()
            if any(len(p) > ctx for p in prompts):
                raise bad_request(
                    RequestError(f"This model's maximum context length is {ctx} tokens.", param="messages")
                )
            return [(_no_more(), _empty_output(len(p))) for p in prompts]
        streams = []
        for i, prompt in enumerate(prompts):
            try:
                params = req.sampling_params(
                    max_tokens,
                    logprobs,
                    i,
                    self.defaults,
                    plan.grammar if plan else None,
                    plan.extra_bias if plan else None,
                )
            except RequestError as e:
                raise bad_request(e) from None
            payload: dict[str, Any] = {
                "request_id": f"{rid}-{i}",
                "prompt_token_ids": prompt,
                "params": params.__dict__,
            }
            streams.append(self.channel.outputs(payload["request_id"], self.channel.submit(payload)))
        started = []
        try:
            for st in streams:
                first = await st.__anext__()
                if "error" in first:
                    raise self._refusal(first)
                started.append((st, first))
        except BaseException as e:
            for st in streams:
                await st.aclose()
            if isinstance(e, RouterGone):
                raise HTTPError(503, str(e), "service_unavailable") from None
            raise
        return started

    def _refusal(self, item: dict[str, Any]) -> HTTPError:
        err = item["error"]
        if item.get("server_error"):
            return HTTPError(503, err["message"], "service_unavailable")
        if err["code"] == "overloaded":
            retry = {"Retry-After": str(self.settings.retry_after_s)}
            return HTTPError(
                self.settings.overload_status, err["message"], "rate_limit_error", None, "overloaded", retry
            )
        return HTTPError(400, err["message"], "invalid_request_error", err["param"], err["code"])

    async def _merged(self, started: list) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(choice index, output) from all choices as they come; aborts all if the consumer leaves
        or the request runs past request_timeout_s (408)."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, st, first) -> None:
            try:
                await q.put((i, first))
                if not first["finished"]:
                    async for item in st:
                        await q.put((i, item))
            except Exception as e:
                await q.put((i, e))

        tasks = [asyncio.create_task(pump(i, st, f)) for i, (st, f) in enumerate(started)]
        timeout = self.settings.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        done = 0
        last: dict[int, float] = {}  # choice -> when its previous output arrived
        try:
            while done < len(started):
                try:
                    i, item = await asyncio.wait_for(
                        q.get(), None if deadline is None else deadline - time.monotonic()
                    )
                except TimeoutError:
                    raise HTTPError(
                        408,
                        f"The request did not finish within {timeout:g} seconds.",
                        "timeout_error",
                        None,
                        "request_timeout",
                    ) from None
                if isinstance(item, Exception):
                    raise item
                if "error" in item:
                    raise RouterGone(item["error"]["message"])
                now = time.monotonic()
                self.serving_metrics.observe_output(
                    now - last[i] if i in last else None, len(item["new_token_ids"]), item.get("queue_time")
                )
                last[i] = now
                if item["finished"]:
                    done += 1
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their streams abort unfinished requests
            for st, _ in started:
                await st.aclose()

    async def _sse(self, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's events; an error after the headers went out becomes an error event + [DONE]."""
        try:
            async for event in events:
                yield event
        except HTTPError as e:
            yield json.dumps(e.body)
            yield "[DONE]"
        except RouterGone as e:
            yield json.dumps(error_body(str(e), "service_unavailable"))
            yield "[DONE]"

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    # ---- endpoints ----

    @app.get("/health")
    async def health(self) -> Response:
        """200 only when the router has its model loaded and its shards connected."""
        try:
            stats = await asyncio.wait_for(self.router.stats.remote(), timeout=5)
        except Exception:  # the router is down, restarting or stuck
            return Response(status_code=503)
        return Response(status_code=200 if stats["ready"] else 503)

    @app.get("/version")
    async def version(self) -> dict[str, str]:
        return {"version": VERSION}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._check_auth(request)
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": created,
                    "owned_by": "raymix",
                    "root": self.names[0],
                    "max_model_len": self.max_model_len,
                }
                for n in self.names
            ],
        }

    @app.get("/metrics")
    async def metrics(self) -> Response:
        stats, load = await asyncio.gather(self.router.stats.remote(), self.router.expert_load.remote())
        body, content_type = self.serving_metrics.render(stats, load)
        return Response(body, media_type=content_type)

    @app.post("/tokenize")
    async def tokenize(self, request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await self._body(request, TokenizeRequest)
        self._model_name(req.model)
        if req.messages is not None:
            tokens = self.tokenizer.apply_chat_template([m.to_template() for m in req.messages])
        elif req.prompt is not None:
            tokens = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise HTTPError(400, "Either prompt or messages is required.", "invalid_request_error", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": await self._context_len()}

    @app.post("/detokenize")
    async def detokenize(self, request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await self._body(request, DetokenizeRequest)
        self._model_name(req.model)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in req.tokens):
            raise HTTPError(
                400,
                f"token ids must be in [0, {self.tokenizer.vocab_size})",
                "invalid_request_error",
                "tokens",
            )
        return {"prompt": self.tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        start = time.monotonic()
        req: ChatCompletionRequest = await self._body(request, ChatCompletionRequest)
        model = self._model_name(req.model)
        plan = await asyncio.to_thread(plan_chat, req, self.tokenizer)  # a schema compiles off the loop
        prompt = self.tokenizer.apply_chat_template(plan.messages, plan.tools)
        max_tokens = await self._max_tokens(req.requested_max_tokens(), len(prompt))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        started = await self._start(rid, [prompt] * req.n, req, max_tokens, req.logprobs_k(), plan)
        outputs = self._merged(started)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(
                self._sse(
                    self._chat_stream(
                        rid, model, created, len(prompt), req.n, outputs, include_usage, start, plan
                    )
                ),
                ping=15,
            )
        first_tokens: list[int | None] = [None] * req.n
        texts, reasons, logprobs, completion_tokens = await collect(outputs, req.n, first_tokens)
        self.serving_metrics.observe_request(
            len(prompt), completion_tokens, time.monotonic() - start, reasons
        )
        choices = []
        for i in range(req.n):
            message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
            calls = None
            if plan.tool_calls_token is not None and first_tokens[i] == plan.tool_calls_token:
                calls = parse_tool_calls(texts[i])
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": self._chat_logprobs(logprobs[i]) if req.logprobs else None,
                    "finish_reason": "tool_calls" if calls and reasons[i] == "stop" else reasons[i],
                }
            )
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": self._usage(len(prompt), completion_tokens),
            }
        )

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """OpenAI's usage, plus DeepInfra's estimated_cost when prices are configured."""
        u: dict[str, Any] = usage(prompt_tokens, completion_tokens)
        s = self.settings
        if s.input_price_per_million is not None or s.output_price_per_million is not None:
            cost = prompt_tokens * (s.input_price_per_million or 0.0)
            cost += completion_tokens * (s.output_price_per_million or 0.0)
            u["estimated_cost"] = cost / 1e6
        return u

    async def _chat_stream(
        self, rid, model, created, prompt_len, n, outputs, include_usage, start, plan
    ) -> AsyncIterator[str]:
        """Role chunk, content deltas, finish chunk per choice; usage; [DONE]. A choice whose
        output starts with [TOOL_CALLS] is held back and sent as tool-call deltas when complete
        (per call: id, type and name, then the arguments)."""

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return stream_chunk(rid, "chat.completion.chunk", created, model, include_usage, choices, **extra)

        def delta(i: int, d: dict[str, Any], lp: Any = None, finish: str | None = None) -> str:
            return chunk([{"index": i, "delta": d, "logprobs": lp, "finish_reason": finish}])

        completion_tokens, reasons = 0, [None] * n
        first_token = True
        calling: list[bool | None] = [None] * n  # per choice: a tool call? (None: not known yet)
        held = [""] * n
        for i in range(n):
            yield delta(i, {"role": "assistant", "content": ""})
        async for i, out in outputs:
            if first_token:
                self.serving_metrics.observe_first_token(time.monotonic() - start)
                first_token = False
            if calling[i] is None and out["new_token_ids"]:
                calling[i] = (
                    plan.tool_calls_token is not None and out["new_token_ids"][0] == plan.tool_calls_token
                )
            lp = self._chat_logprobs(out["new_logprobs"]) if out["new_logprobs"] else None
            if calling[i]:
                held[i] += out["new_text"]
            elif out["new_text"] or lp:
                yield delta(i, {"content": out["new_text"]}, lp)
            if out["finished"]:
                reason = out["finish_reason"]
                if calling[i]:
                    calls = parse_tool_calls(held[i])
                    if calls is None:  # not a well-formed call after all: it was text
                        yield delta(i, {"content": held[i]})
                    else:
                        for k, c in enumerate(calls):
                            head = {"index": k, "id": c["id"], "type": "function"}
                            yield delta(
                                i,
                                {
                                    "tool_calls": [
                                        head | {"function": {"name": c["function"]["name"], "arguments": ""}}
                                    ]
                                },
                            )
                            yield delta(
                                i,
                                {
                                    "tool_calls": [
                                        {"index": k, "function": {"arguments": c["function"]["arguments"]}}
                                    ]
                                },
                            )
                        reason = "tool_calls" if reason == "stop" else reason
                reasons[i] = reason
                completion_tokens += out["num_output_tokens"]
                yield delta(i, {}, None, reason)
        self.serving_metrics.observe_request(prompt_len, completion_tokens, time.monotonic() - start, reasons)
        if include_usage:
            yield chunk([], usage=self._usage(prompt_len, completion_tokens))
        yield "[DONE]"

    def _chat_logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token_id)
            return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

        return {
            "content": [
                entry(lp["token_id"], lp["logprob"]) | {"top_logprobs": [entry(t, v) for t, v in lp["top"]]}
                for lp in lps
            ]
        }

    @app.post("/predict")
    @app.post("/production/predict")
    async def predict(self, request: Request) -> Response:
        """Baseten's REST API: `{"output": ...}` (the conversation as the model saw it, then the
        answer), or with `stream` the answer's text as plain chunks."""
        start = time.monotonic()
        req: PredictRequest = await self._body(request, PredictRequest)
        self._model_name(req.model)
        prompt = self.tokenizer.apply_chat_template([m.to_template() for m in req.messages])
        max_tokens = await self._max_tokens(req.max_new_tokens, len(prompt))
        outputs = self._merged(
            await self._start(f"predict-{uuid.uuid4().hex}", [prompt], req, max_tokens, None)
        )
        if req.stream:
            return StreamingResponse(self._plain_text(outputs, len(prompt), start), media_type="text/plain")
        texts, reasons, _, completion_tokens = await collect(outputs, 1)
        self.serving_metrics.observe_request(
            len(prompt), completion_tokens, time.monotonic() - start, reasons
        )
        return JSONResponse({"output": self.tokenizer.decode(prompt, skip_special_tokens=False) + texts[0]})

    async def _plain_text(self, outputs, prompt_len: int, start: float) -> AsyncIterator[str]:
        completion_tokens, reasons, first = 0, [None], True
        try:
            async for _, out in outputs:
                if first:
                    self.serving_metrics.observe_first_token(time.monotonic() - start)
                    first = False
                if out["new_text"]:
                    yield out["new_text"]
                if out["finished"]:
                    reasons[0], completion_tokens = out["finish_reason"], out["num_output_tokens"]
        except (HTTPError, RouterGone) as e:  # plain text has no error event: log it and end
            log.warning("predict stream ended early: %s", e)
            return
        self.serving_metrics.observe_request(prompt_len, completion_tokens, time.monotonic() - start, reasons)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        start = time.monotonic()
        req: CompletionRequest = await self._body(request, CompletionRequest)
        model = self._model_name(req.model)
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in req.prompts()]
        if len(prompts) > 1 and req.stream:
            raise HTTPError(400, "Streaming takes a single prompt.", "invalid_request_error", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        per_choice = [p for p in prompts for _ in range(req.n)]  # choice k: prompt k // n
        outputs = self._merged(await self._start(rid, per_choice, req, req.max_tokens, req.logprobs))
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return EventSourceResponse(
                self._sse(self._completion_stream(rid, model, created, prompt_tokens, req, outputs, start)),
                ping=15,
            )
        k = len(per_choice)
        texts, reasons, lps, completion_tokens = await collect(outputs, k)
        self.serving_metrics.observe_request(
            prompt_tokens, completion_tokens, time.monotonic() - start, reasons
        )
        choices = [
            {
                "index": i,
                "text": (self.tokenizer.decode(per_choice[i]) if req.echo else "") + texts[i],
                "logprobs": self._completion_logprobs(lps[i]) if req.logprobs is not None else None,
                "finish_reason": reasons[i],
            }
            for i in range(k)
        ]
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": self._usage(prompt_tokens, completion_tokens),
            }
        )

    async def _completion_stream(
        self, rid, model, created, prompt_len, req, outputs, start
    ) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion_tokens, reasons = 0, [None] * req.n
        first_token = True

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return stream_chunk(rid, "text_completion", created, model, include_usage, choices, **extra)

        async for i, out in outputs:
            if first_token:
                self.serving_metrics.observe_first_token(time.monotonic() - start)
                first_token = False
            lp = self._completion_logprobs(out["new_logprobs"]) if req.logprobs is not None else None
            if out["finished"]:
                reasons[i] = out["finish_reason"]
                completion_tokens += out["num_output_tokens"]
            if out["new_text"] or out["finished"]:
                yield chunk(
                    [
                        {
                            "index": i,
                            "text": out["new_text"],
                            "logprobs": lp,
                            "finish_reason": out["finish_reason"] if out["finished"] else None,
                        }
                    ]
                )
        self.serving_metrics.observe_request(prompt_len, completion_tokens, time.monotonic() - start, reasons)
        if include_usage:
            yield chunk([], usage=self._usage(prompt_len, completion_tokens))
        yield "[DONE]"

    def _completion_logprobs(self, lps: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "tokens": [self._token_text(lp["token_id"]) for lp in lps],
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{self._token_text(t): v for t, v in lp["top"]} for lp in lps],
        }
