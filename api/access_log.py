"""Request tracing and the access log: one request id per HTTP request, one JSON line per request.

`AccessLog` (ASGI middleware, outermost) takes the client's `X-Request-Id` (or makes one),
answers with it in the `X-Request-Id` header (unless a proxy in front does: Ray Serve's proxy
puts the id in the request's headers, making one when the client sent none, and answers with it
itself), and when the response is done writes one line to
the `raymix.access` logger: request id, method, path, status, model, prompt and completion
tokens, time to first token, latency, finish reasons. Prompts are never logged unless the
operator opts in (`access_log_prompts`). The endpoints fill the line's fields through
`current()`, the record of the request being served (a context variable, so streamed answers,
whose bodies are produced after the endpoint returned, fill the same record). The serving
modules name the response and the engine requests after the request id, so the router's log
lines carry it too.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("raymix.access")
QUIET_PATHS = {"/health", "/metrics", "/experts"}  # polled every few seconds: not logged
CLIENT_CLOSED_REQUEST = 499  # the client left before the answer was complete (nginx's and Serve's)
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass
class AccessRecord:
    request_id: str
    method: str
    path: str
    start: float = field(default_factory=time.monotonic)
    status: int | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    finish_reasons: list[str | None] = field(default_factory=list)
    prompt: Any = None  # only when the operator opted in

    def line(self) -> str:
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "latency_s": round(time.monotonic() - self.start, 4),
            "finish_reason": self.finish_reasons[0]
            if len(self.finish_reasons) == 1
            else self.finish_reasons or None,
        }
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        return json.dumps(fields, ensure_ascii=False)


_current: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("raymix_access", default=None)


def to_stderr() -> None:
    """Write the access log to this process's stderr (a Ray replica's log file) at INFO, one
    JSON line each, whatever the process's other logging."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def current() -> AccessRecord | None:
    """The record of the HTTP request being served (None outside one)."""
    return _current.get()


def request_id() -> str:
    """The request id of the HTTP request being served (a new one outside one)."""
    record = _current.get()
    return record.request_id if record is not None else uuid.uuid4().hex


class AccessLog:
    def __init__(self, app: ASGIApp, log_prompts: bool = False, echo_request_id: bool = True) -> None:
        """echo_request_id: answer with the X-Request-Id header (off behind a proxy that does)."""
        self.app = app
        self.log_prompts = log_prompts
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        record = AccessRecord(rid, scope["method"], scope["path"])
        token = _current.set(record)
        if self.log_prompts:
            scope = {**scope, "raymix.log_prompts": True}

        complete = gone = False  # the whole answer sent; the client went away first

        async def send_with_id(message: Message) -> None:
            nonlocal complete
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if self.echo_request_id:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def watch_disconnect() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        try:
            await self.app(scope, watch_disconnect, send_with_id)
        except asyncio.CancelledError:  # Serve's proxy cancels a request whose client left
            gone = True
            raise
        finally:
            _current.reset(token)
            if gone and not complete:
                record.status = CLIENT_CLOSED_REQUEST
            record.status = record.status or 500  # an exception answered outside: a server error
            if record.path not in QUIET_PATHS:
                log.info(record.line())
