"""POST /v1/chat/completions: the chat template, tools, reasoning and structured output, JSON or SSE.

Each choice's output is read by the plan's parser (api.chat_plan): the model's reasoning goes to
`reasoning_content`, its text to `content`, and a tool call in its format (when the request has
tools) to `tool_calls`; streamed, reasoning and text go out as they come, and a call is held
back until complete and sent as tool-call deltas (per call: id, type and name, then the
arguments).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.access_log import request_id
from api.chat_plan import ChatPlan, Parsed, plan_chat
from api.context import ServingContext, text_size
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
from moe.sampling import Logprobs

log = logging.getLogger("ray.serve")


class ServingChat:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        # template, schema: off the loop
        plan = await ctx.off_loop(text_size(req.messages), plan_chat, req, ctx.tokenizer)
        prompt = plan.prompt
        max_tokens = await ctx.max_tokens(req.requested_max_tokens(), len(prompt))
        rid = f"chatcmpl-{request_id()}"  # X-Request-Id when the client sent one
        choices = await start_choices(
            ctx, rid, [prompt] * req.n, len(prompt), req, max_tokens, req.logprobs_k(), plan, req.stream
        )
        created = int(time.time())
        if req.stream:
            return sse_response(self._stream(choices, rid, model, created, req.include_usage(), plan))
        results = await choices.collect()
        out = []
        for i, r in enumerate(results):
            parsed = plan.parser().whole(r.text, r.token_ids)
            calls = parsed.calls
            message = ChatMessageOut(
                content=(parsed.content or None) if calls else parsed.content,  # whitespace alone: ""
                reasoning_content=parsed.reasoning or None,
                tool_calls=calls,
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
    ) -> AsyncIterator[str]:
        """Role chunk, reasoning and content deltas, tool calls, finish chunk per choice; usage; [DONE]."""
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

        def shown(p: Parsed) -> DeltaMessage | None:
            if not (p.reasoning or p.content):
                return None
            return DeltaMessage(reasoning_content=p.reasoning or None, content=p.content or None)

        parsers = [plan.parser() for _ in range(choices.n)]
        for i in range(choices.n):
            yield delta(i, DeltaMessage(role="assistant", content=""))
        async for i, out in choices:
            lp = self._logprobs(out.new_logprobs) if out.new_logprobs else None
            d = shown(parsers[i].feed(out.new_text, out.new_token_ids))
            if d is not None or lp:
                yield delta(i, d or DeltaMessage(content=""), lp)
            if not out.finished:
                continue
            last = parsers[i].finish()
            if (d := shown(last)) is not None:
                yield delta(i, d)
            reason = out.finish_reason
            for k, c in enumerate(last.calls or []):
                head = ToolCallDelta(
                    index=k,
                    id=c.id,
                    type="function",
                    function=FunctionDelta(name=c.function.name, arguments=""),
                )
                yield delta(i, DeltaMessage(tool_calls=[head]))
                args = ToolCallDelta(index=k, function=FunctionDelta(arguments=c.function.arguments))
                yield delta(i, DeltaMessage(tool_calls=[args]))
            if last.calls and reason == "stop":
                reason = "tool_calls"
            yield delta(i, DeltaMessage(), None, reason)
        if include_usage:
            usage = self.ctx.usage(choices.prompt_tokens, choices.completion_tokens)
            last_chunk = ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)
            yield json.dumps(last_chunk.body())
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
