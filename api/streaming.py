"""From engine outputs to answers, once for every endpoint: start, fan-in, timeout, metrics, SSE.

`start_choices` submits one engine request per choice (choice i: its prompt, seed + i) and waits
for every choice's first output, where the engine's refusals show, so a refused request is an
HTTP error before any byte of an answer goes out. `ChoiceStream` then yields `(choice, output)`
as outputs arrive, enforces `request_timeout_s` (408), observes every per-output and
per-request metric, and aborts what is left if its reader leaves early. `sse_response` turns an
error raised after the headers went out into an error event followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from sse_starlette.sse import EventSourceResponse

from api import access_log
from api.chat_plan import ChatPlan
from api.context import ServingContext
from api.engine_client import Outputs
from api.errors import APIError, EngineUnavailable
from api.protocol import SamplingFields, error_body
from cluster.messages import GenerateRequest, Refusal
from moe.engine.sequence import RequestOutput
from moe.errors import RequestError
from moe.sampling import Logprobs


def _empty_output(request_id: str, prompt_tokens: int) -> RequestOutput:
    """The one output of a request for zero tokens: finished at once, by length."""
    return RequestOutput(request_id, [], "", [], True, "length", None, prompt_tokens, 0)


async def start_choices(
    ctx: ServingContext,
    request_id: str,
    prompts: list[list[int]],
    prompt_tokens: int,
    req: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    plan: ChatPlan | None = None,
    streaming: bool = False,
    prompt_logprobs: int | None = None,
    prompt_param: str = "messages",
) -> ChoiceStream:
    """Submit choice i (prompts[i]) as engine request `{request_id}-{i}-{tag}` and wait for
    every choice's first output. The tag is new for every HTTP request: a client's X-Request-Id
    is a trace id, not a key (gateways send one id with several calls), so the engine's ids
    are unique whatever the client sent, and still carry it into the router's log lines.
    `prompt_tokens`: the request's, as usage counts them; `prompt_logprobs`: k to score the
    prompts' tokens too (completions' echo); `prompt_param`: what a too-long prompt is
    called in the request (messages, prompt, input)."""
    start = time.monotonic()
    tag = secrets.token_hex(4)
    rids = [f"{request_id}-{i}-{tag}" for i in range(len(prompts))]
    if max_tokens == 0 and prompt_logprobs is None:  # nothing to compute (DeepInfra allows it)
        ctx_len = await ctx.context_len()
        if any(len(p) > ctx_len for p in prompts):
            raise APIError.bad_request(
                f"This model's maximum context length is {ctx_len} tokens.", prompt_param
            )
        empty = [_empty_output(rid, len(p)) for rid, p in zip(rids, prompts, strict=True)]
        return ChoiceStream(ctx, None, rids, empty, prompt_tokens, start, streaming)
    requests = []
    for i, (rid, prompt) in enumerate(zip(rids, prompts, strict=True)):
        try:
            params = req.sampling_params(
                max_tokens,
                logprobs,
                i,
                ctx.defaults,
                plan.grammar if plan else None,
                plan.extra_bias if plan else None,
                prompt_logprobs,
            )
        except RequestError as e:
            raise APIError.from_request_error(e) from None
        requests.append(GenerateRequest(rid, prompt, params))
    try:
        outputs = ctx.engine.submit(requests)
    except EngineUnavailable as e:
        raise APIError.unavailable(str(e)) from None
    index = {rid: i for i, rid in enumerate(rids)}
    firsts: list[RequestOutput | None] = [None] * len(rids)
    early: list[RequestOutput] = []  # later outputs of a choice that arrived before all firsts
    timeout = ctx.settings.request_timeout_s  # one deadline from the request's start: the wait
    deadline = None if timeout is None else start + timeout  # for the first outputs counts too
    try:
        while any(f is None for f in firsts):
            try:
                item = await asyncio.wait_for(
                    outputs.next(), None if deadline is None else max(0.0, deadline - time.monotonic())
                )
            except TimeoutError:
                raise timed_out(ctx) from None
            if isinstance(item, Refusal):
                s = ctx.settings
                raise APIError.from_refusal(item, s.overload_status, s.retry_after_s, prompt_param)
            i = index[item.request_id]
            if (record := access_log.current()) is not None and record.ttft_s is None:
                record.ttft_s = time.monotonic() - start
            if firsts[i] is None:
                firsts[i] = item
            else:
                early.append(item)
    except BaseException as e:
        outputs.close()
        if isinstance(e, EngineUnavailable):
            raise APIError.unavailable(str(e)) from None
        raise
    ready = [f for f in firsts if f is not None] + early
    return ChoiceStream(ctx, outputs, rids, ready, prompt_tokens, start, streaming)


def timed_out(ctx: ServingContext) -> APIError:
    return APIError(
        408,
        f"The request did not finish within {ctx.settings.request_timeout_s:g} seconds.",
        "timeout_error",
        None,
        "request_timeout",
    )


@dataclass
class ChoiceResult:
    """A choice's whole answer (non-streaming endpoints)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs | None] | None = None
    finish_reason: str | None = None


class ChoiceStream:
    """`(choice index, output)` of every choice of one HTTP request, as the engine produces them."""

    def __init__(
        self,
        ctx: ServingContext,
        outputs: Outputs | None,
        request_ids: list[str],  # choice i's engine request
        ready: list[RequestOutput],  # outputs received already: every choice's first, in order
        prompt_tokens: int,
        start: float,
        streaming: bool,
    ):
        self.ctx = ctx
        self.outputs = outputs
        self.ready = ready
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.n = len(request_ids)
        self.prompt_tokens = prompt_tokens
        self.start = start
        self.streaming = streaming  # a stream's first output is its time to first token
        self.completion_tokens = 0
        self.finish_reasons: list[str | None] = [None] * self.n

    def close(self) -> None:
        if self.outputs is not None:
            self.outputs.close()

    async def _next(self, deadline: float | None) -> RequestOutput:
        if self.ready:
            return self.ready.pop(0)
        assert self.outputs is not None
        try:
            item = await asyncio.wait_for(
                self.outputs.next(), None if deadline is None else deadline - time.monotonic()
            )
        except TimeoutError:
            raise timed_out(self.ctx) from None
        if isinstance(item, Refusal):  # refused mid-way: the engine step failed
            raise EngineUnavailable(item.message)
        return item

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        metrics = self.ctx.metrics
        timeout = self.ctx.settings.request_timeout_s
        deadline = None if timeout is None else self.start + timeout  # from the request's start
        last: dict[int, float] = {}  # choice -> when its previous output arrived
        done = 0
        try:
            while done < self.n:
                out = await self._next(deadline)
                i = self.index[out.request_id]
                now = time.monotonic()
                if self.streaming and not last:
                    metrics.observe_first_token(now - self.start)
                metrics.observe_output(
                    now - last[i] if i in last else None, len(out.new_token_ids), out.queue_time
                )
                last[i] = now
                if out.finished:
                    done += 1
                    self.finish_reasons[i] = out.finish_reason
                    self.completion_tokens += out.num_output_tokens
                yield i, out
        finally:
            self.close()
        metrics.observe_request(
            self.prompt_tokens, self.completion_tokens, time.monotonic() - self.start, self.finish_reasons
        )
        if (record := access_log.current()) is not None:
            record.prompt_tokens, record.completion_tokens = self.prompt_tokens, self.completion_tokens
            record.finish_reasons = list(self.finish_reasons)

    async def collect(self) -> list[ChoiceResult]:
        """Every choice's whole answer (the non-streaming endpoints)."""
        results = [ChoiceResult() for _ in range(self.n)]
        async for i, out in self:
            r = results[i]
            r.text += out.new_text
            r.token_ids += out.new_token_ids
            r.logprobs += out.new_logprobs
            if out.prompt_logprobs is not None:
                r.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                r.finish_reason = out.finish_reason
        return results


def sse_response(
    events: AsyncIterator[str] | AsyncIterator[dict[str, str]], done: bool = True
) -> EventSourceResponse:
    """Server-sent events (data lines, or {"event", "data"} for named events); an error after the
    headers went out is an error event, then [DONE] (`done`: the chat and completions streams
    end with it; the Responses API's ends at its last event and has a typed error event)."""

    def error(body: dict) -> str | dict[str, str]:
        if done:
            return json.dumps(body)
        return {"event": "error", "data": json.dumps({"type": "error", **body["error"]})}

    async def guarded() -> AsyncIterator[str | dict[str, str]]:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield error(e.body)
        except EngineUnavailable as e:
            yield error(error_body(str(e), "service_unavailable"))
        else:
            return
        if done:
            yield "[DONE]"

    return EventSourceResponse(guarded(), ping=15)
