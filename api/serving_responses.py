"""POST /v1/responses: OpenAI's Responses API, stateless, over the chat path.

The request (`input` as a string or a list of messages, function calls and their outputs;
`instructions`, function `tools`, `tool_choice`, `text.format`) becomes a chat request
(`ResponsesRequest.to_chat`), so it gets the same chat template, tool-call grammar and
structured output. The answer is a `response` whose `output` holds one message (its text as
`output_text`) or the `function_call` items the model made; cut by `max_output_tokens`, it is
`incomplete`. Streamed, it is the Responses event sequence, each event with its
`sequence_number`: `response.created`, `response.in_progress`, then per output item
`response.output_item.added`, its content part (`response.content_part.added`, the
`response.output_text.delta`s, `response.output_text.done`, `response.content_part.done`) or
its arguments (`response.function_call_arguments.delta` and `.done`), `response.output_item.done`,
and last `response.completed` (or `response.incomplete`). A function call is held back until it
is complete, as in chat. Nothing is stored (`store` answers false).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.access_log import request_id
from api.context import ServingContext
from api.protocol import (
    ResponseFunctionCallItem,
    ResponseMessageItem,
    ResponseObject,
    ResponseOutputText,
    ResponsesRequest,
    ResponseUsage,
)
from api.streaming import ChoiceStream, sse_response, start_choices
from api.tool_calls import ChatPlan, calls_of, plan_chat

OutputItem = ResponseMessageItem | ResponseFunctionCallItem
Event = dict[str, str]


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ServingResponses:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, req: ResponsesRequest) -> Response:
        ctx = self.ctx
        model = ctx.model_name(req.model)
        chat = req.to_chat()
        plan = await asyncio.to_thread(plan_chat, chat, ctx.tokenizer)  # a schema compiles off the loop
        prompt = ctx.tokenizer.apply_chat_template(plan.messages, plan.tools)
        max_tokens = await ctx.max_tokens(chat.requested_max_tokens(), len(prompt))
        rid = f"resp_{request_id()}"  # X-Request-Id when the client sent one
        choices = await start_choices(
            ctx, rid, [prompt], len(prompt), chat, max_tokens, None, plan, req.stream, prompt_param="input"
        )
        base = ResponseObject.of(req, rid, model, int(time.time()))
        if req.stream:
            return sse_response(self._stream(choices, base, plan, req.parallel_tool_calls), done=False)
        (result,) = await choices.collect()
        output = self._output(result.text, result.token_ids, plan, req.parallel_tool_calls)
        usage = ResponseUsage.of(len(prompt), choices.completion_tokens)
        return JSONResponse(base.finished(output, result.finish_reason, usage).body())

    @staticmethod
    def _output(text: str, token_ids: list[int], plan: ChatPlan, parallel: bool) -> list[OutputItem]:
        """A finished answer as output items: the function calls it made, or one message."""
        if plan.tool_calls_token is not None and token_ids[:1] == [plan.tool_calls_token]:
            return [
                ResponseFunctionCallItem(
                    id=_new_id("fc"), call_id=c.id, name=c.function.name, arguments=c.function.arguments
                )
                for c in calls_of(text, parallel) or []
            ]
        return [ResponseMessageItem(id=_new_id("msg"), content=[ResponseOutputText(text=text)])]

    async def _stream(
        self, choices: ChoiceStream, base: ResponseObject, plan: ChatPlan, parallel: bool
    ) -> AsyncIterator[Event]:
        seq = 0

        def event(kind: str, **fields: Any) -> Event:
            nonlocal seq
            seq += 1
            return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": seq - 1, **fields})}

        yield event("response.created", response=base.body())
        yield event("response.in_progress", response=base.body())
        calling: bool | None = None  # a function call? (None: not known before the first token)
        message: ResponseMessageItem | None = None
        held, token_ids, finish = "", [], None
        async for _, out in choices:
            if calling is None and out.new_token_ids:
                calling = plan.tool_calls_token is not None and out.new_token_ids[0] == plan.tool_calls_token
            token_ids += out.new_token_ids
            if calling:
                held += out.new_text
            elif out.new_text:
                if message is None:
                    message = ResponseMessageItem(id=_new_id("msg"), status="in_progress", content=[])
                    for e in self._open(message, event):
                        yield e
                message.content[0].text += out.new_text
                yield event(
                    "response.output_text.delta",
                    item_id=message.id,
                    output_index=0,
                    content_index=0,
                    delta=out.new_text,
                    logprobs=[],
                )
            if out.finished:
                finish = out.finish_reason
        cut = finish == "length"
        output: list[OutputItem]
        if calling:
            output = self._output(held, token_ids, plan, parallel)
            for k, item in enumerate(output):
                assert isinstance(item, ResponseFunctionCallItem)
                if cut:
                    item.status = "incomplete"
                opened = {**item.body(), "arguments": "", "status": "in_progress"}
                yield event("response.output_item.added", output_index=k, item=opened)
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=k,
                    delta=item.arguments,
                )
                yield event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=k,
                    name=item.name,
                    arguments=item.arguments,
                )
                yield event("response.output_item.done", output_index=k, item=item.body())
        else:
            if message is None:  # no text at all: still one message, empty
                message = ResponseMessageItem(id=_new_id("msg"), status="in_progress", content=[])
                for e in self._open(message, event):
                    yield e
            message.status = "incomplete" if cut else "completed"
            part = message.content[0]
            at = {"item_id": message.id, "output_index": 0, "content_index": 0}
            yield event("response.output_text.done", **at, text=part.text, logprobs=[])
            yield event("response.content_part.done", **at, part=part.model_dump())
            yield event("response.output_item.done", output_index=0, item=message.body())
            output = [message]
        usage = ResponseUsage.of(choices.prompt_tokens, choices.completion_tokens)
        done = base.finished(output, finish, usage)
        yield event(f"response.{done.status}", response=done.body())

    @staticmethod
    def _open(message: ResponseMessageItem, event: Callable[..., Event]) -> list[Event]:
        """A message item's first two events; its (empty) text part is added to it."""
        added = event("response.output_item.added", output_index=0, item=message.body())
        part = ResponseOutputText(text="")
        message.content.append(part)
        opened = event(
            "response.content_part.added",
            item_id=message.id,
            output_index=0,
            content_index=0,
            part=part.model_dump(),
        )
        return [added, opened]
