"""POST /v1/chat/completions: the chat template, tools and structured output, JSON or SSE.

A choice whose output starts with the tokenizer's [TOOL_CALLS] token (when the request has
tools) is read back as OpenAI `tool_calls`; streamed, it is held back until complete and sent
as tool-call deltas (per call: id, type and name, then the arguments).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.access_log import request_id
from api.context import ServingContext
from api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatMessageOut,
    DeltaMessage,
    FunctionDelta,
    ToolCallDelta,
    TopLogprob,
)
from api.streaming import ChoiceStream, sse_response, start_choices
from api.tool_calls import ChatPlan, calls_of, plan_chat
from moe.sampling import Logprobs

log = logging.getLogger("ray.serve")


class ServingChat:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        plan = await asyncio.to_thread(plan_chat, req, ctx.tokenizer)  # a schema compiles off the loop
        prompt = ctx.tokenizer.apply_chat_template(plan.messages, plan.tools)
        max_tokens = await ctx.max_tokens(req.requested_max_tokens(), len(prompt))
        rid = f"chatcmpl-{request_id()}"  # X-Request-Id when the client sent one
        choices = await start_choices(
            ctx, rid, [prompt] * req.n, len(prompt), req, max_tokens, req.logprobs_k(), plan, req.stream
        )
        created = int(time.time())
        if req.stream:
            return sse_response(
                self._stream(choices, rid, model, created, req.include_usage(), plan, req.parallel_tool_calls)
            )
        results = await choices.collect()
        out = []
        for i, r in enumerate(results):
            calls, text = None, r.text
            if plan.tool_calls_token is not None and r.token_ids[:1] == [plan.tool_calls_token]:
                calls, text = calls_of(r.text, req.parallel_tool_calls), ""
            message = (
                ChatMessageOut(content=None, tool_calls=calls) if calls else ChatMessageOut(content=text)
            )
            out.append(
                ChatChoice(
                    index=i,
                    message=message,
                    logprobs=self._logprobs(r.logprobs) if req.logprobs else None,
                    finish_reason="tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason,
                )
            )
        usage = ctx.usage(len(prompt), choices.completion_tokens)
        body = ChatCompletionResponse(id=rid, created=created, model=model, choices=out, usage=usage)
        return JSONResponse(body.body())

    async def _stream(
        self,
        choices: ChoiceStream,
        rid: str,
        model: str,
        created: int,
        include_usage: bool,
        plan: ChatPlan,
        parallel: bool,
    ) -> AsyncIterator[str]:
        """Role chunk, content deltas, finish chunk per choice; usage; [DONE]."""
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def delta(i: int, d: DeltaMessage, lp: ChatLogprobs | None = None, finish: str | None = None) -> str:
            chunk = ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[ChatChunkChoice(index=i, delta=d, logprobs=lp, finish_reason=finish)],
                **extra,
            )
            return json.dumps(chunk.body())

        calling: list[bool | None] = [None] * choices.n  # per choice: a tool call? (None: not known yet)
        held = [""] * choices.n
        for i in range(choices.n):
            yield delta(i, DeltaMessage(role="assistant", content=""))
        async for i, out in choices:
            if calling[i] is None and out.new_token_ids:
                calling[i] = (
                    plan.tool_calls_token is not None and out.new_token_ids[0] == plan.tool_calls_token
                )
            lp = self._logprobs(out.new_logprobs) if out.new_logprobs else None
            if calling[i]:
                held[i] += out.new_text
            elif out.new_text or lp:
                yield delta(i, DeltaMessage(content=out.new_text), lp)
            if not out.finished:
                continue
            reason = out.finish_reason
            if calling[i]:
                calls = calls_of(held[i], parallel)
                if calls is not None:
                    for k, c in enumerate(calls):
                        head = ToolCallDelta(
                            index=k,
                            id=c.id,
                            type="function",
                            function=FunctionDelta(name=c.function.name, arguments=""),
                        )
                        yield delta(i, DeltaMessage(tool_calls=[head]))
                        args = ToolCallDelta(index=k, function=FunctionDelta(arguments=c.function.arguments))
                        yield delta(i, DeltaMessage(tool_calls=[args]))
                    reason = "tool_calls" if reason == "stop" else reason
            yield delta(i, DeltaMessage(), None, reason)
        if include_usage:
            usage = self.ctx.usage(choices.prompt_tokens, choices.completion_tokens)
            last = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
            yield json.dumps(last.body())
        yield "[DONE]"

    def _logprobs(self, lps: list[Logprobs]) -> ChatLogprobs:
        def entry(cls: type[TopLogprob], token_id: int, logprob: float, **extra: Any) -> Any:
            text = self.ctx.tokenizer.token_text(token_id)
            return cls(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode()), **extra)

        return ChatLogprobs(
            content=[
                entry(
                    ChatLogprob,
                    lp.token_id,
                    lp.logprob,
                    top_logprobs=[entry(TopLogprob, t, v) for t, v in lp.top],
                )
                for lp in lps
            ]
        )
