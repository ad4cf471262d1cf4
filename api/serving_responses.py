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
and last `response.completed` (or `response.incomplete`). The model's reasoning comes first, as a
`reasoning` item whose `reasoning_text` part streams as `response.reasoning_text.delta`s (as
vLLM gives it). A function call is held back until it is complete, as in chat. Nothing is
stored (`store` answers false).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response

from api.access_log import request_id
from api.chat_plan import ChatPlan, Parsed, plan_chat
from api.context import ServingContext, text_size
from api.protocol import (
    ResponseFunctionCallItem,
    ResponseMessageItem,
    ResponseObject,
    ResponseOutputText,
    ResponseReasoningItem,
    ResponseReasoningText,
    ResponsesRequest,
    ResponseUsage,
)
from api.streaming import ChoiceStream, sse_response, start_choices

OutputItem = ResponseReasoningItem | ResponseMessageItem | ResponseFunctionCallItem
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
        # template, schema: off the loop
        plan = await ctx.off_loop(text_size(chat.messages), plan_chat, chat, ctx.tokenizer)
        prompt = plan.prompt
        max_tokens = await ctx.max_tokens(chat.requested_max_tokens(), len(prompt))
        rid = f"resp_{request_id()}"  # X-Request-Id when the client sent one
        choices = await start_choices(
            ctx, rid, [prompt], len(prompt), chat, max_tokens, None, plan, req.stream, prompt_param="input"
        )
        base = ResponseObject.of(req, rid, model, int(time.time()))
        if req.stream:
            return sse_response(self._stream(choices, base, plan), done=False)
        (result,) = await choices.collect()
        output = self._output(plan.parser().whole(result.text, result.token_ids))
        usage = ResponseUsage.of(len(prompt), choices.completion_tokens)
        return JSONResponse(base.finished(output, result.finish_reason, usage).body())

    @staticmethod
    def _output(parsed: Parsed) -> list[OutputItem]:
        """A finished answer as output items: its reasoning, then its message or the calls it made."""
        out: list[OutputItem] = []
        if parsed.reasoning:
            out.append(
                ResponseReasoningItem(
                    id=_new_id("rs"), content=[ResponseReasoningText(text=parsed.reasoning)]
                )
            )
        if parsed.content or not parsed.calls:
            out.append(
                ResponseMessageItem(id=_new_id("msg"), content=[ResponseOutputText(text=parsed.content)])
            )
        for c in parsed.calls or []:
            item = ResponseFunctionCallItem(
                id=_new_id("fc"), call_id=c.id, name=c.function.name, arguments=c.function.arguments
            )
            out.append(item)
        return out

    async def _stream(
        self, choices: ChoiceStream, base: ResponseObject, plan: ChatPlan
    ) -> AsyncIterator[Event]:
        """Reasoning (an item of its own) and text stream as they come; calls once complete."""
        seq = 0

        def event(kind: str, **fields: Any) -> Event:
            nonlocal seq
            seq += 1
            return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": seq - 1, **fields})}

        yield event("response.created", response=base.body())
        yield event("response.in_progress", response=base.body())
        parser = plan.parser()
        output: list[OutputItem] = []
        open_item: ResponseReasoningItem | ResponseMessageItem | None = None
        finish = None

        def close(status: str) -> list[Event]:
            """The open item's last events."""
            nonlocal open_item
            item, open_item = open_item, None
            if item is None:
                return []
            item.status = status  # type: ignore[assignment]
            at = {"item_id": item.id, "output_index": len(output) - 1, "content_index": 0}
            part = item.content[0]
            kind = "reasoning_text" if isinstance(item, ResponseReasoningItem) else "output_text"
            extra: dict[str, Any] = {} if kind == "reasoning_text" else {"logprobs": []}
            return [
                event(f"response.{kind}.done", **at, text=part.text, **extra),
                event("response.content_part.done", **at, part=part.model_dump()),
                event("response.output_item.done", output_index=len(output) - 1, item=item.body()),
            ]

        def write(kind: str, text: str) -> list[Event]:
            """Text of the reasoning or the message: its item opened first if need be."""
            nonlocal open_item
            events: list[Event] = []
            want = ResponseReasoningItem if kind == "reasoning" else ResponseMessageItem
            if not isinstance(open_item, want):
                events += close("completed")
                item: ResponseReasoningItem | ResponseMessageItem
                if kind == "reasoning":
                    item = ResponseReasoningItem(id=_new_id("rs"), status="in_progress", content=[])
                    part: ResponseReasoningText | ResponseOutputText = ResponseReasoningText(text="")
                else:
                    item = ResponseMessageItem(id=_new_id("msg"), status="in_progress", content=[])
                    part = ResponseOutputText(text="")
                output.append(item)
                open_item = item
                events.append(
                    event("response.output_item.added", output_index=len(output) - 1, item=item.body())
                )
                item.content.append(part)  # type: ignore[arg-type]
                at = {"item_id": item.id, "output_index": len(output) - 1, "content_index": 0}
                events.append(event("response.content_part.added", **at, part=part.model_dump()))
            assert open_item is not None
            open_item.content[0].text += text
            at = {"item_id": open_item.id, "output_index": len(output) - 1, "content_index": 0}
            if kind == "reasoning":
                events.append(event("response.reasoning_text.delta", **at, delta=text))
            else:
                events.append(event("response.output_text.delta", **at, delta=text, logprobs=[]))
            return events

        def show(p: Parsed) -> list[Event]:
            return (write("reasoning", p.reasoning) if p.reasoning else []) + (
                write("message", p.content) if p.content else []
            )

        last = Parsed()
        async for _, out in choices:
            for e in show(parser.feed(out.new_text, out.new_token_ids)):
                yield e
            if out.finished:
                finish = out.finish_reason
                last = parser.finish()
                for e in show(last):
                    yield e
        cut = finish == "length"
        if not last.calls and not any(isinstance(i, ResponseMessageItem) for i in output):
            for e in write("message", ""):  # no text at all: still one message, empty
                yield e
        for e in close("incomplete" if cut else "completed"):
            yield e
        for c in last.calls or []:
            item = ResponseFunctionCallItem(
                id=_new_id("fc"), call_id=c.id, name=c.function.name, arguments=c.function.arguments
            )
            if cut:
                item.status = "incomplete"
            output.append(item)
            k = len(output) - 1
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
        usage = ResponseUsage.of(choices.prompt_tokens, choices.completion_tokens)
        done = base.finished(output, finish, usage)
        yield event(f"response.{done.status}", response=done.body())
