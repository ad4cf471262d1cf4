"""What a chat request asks of its output, and reading tool calls back out of it.

`plan_chat` turns `tools`, `tool_choice`, `response_format` and Mistral's `safe_prompt` into
what the engine needs: the messages and tools for the prompt, the grammar (moe.guided) that
forced tool calls and JSON output are decoded under, and a bias that keeps `tool_choice: none`
from calling. `parse_tool_calls` reads Mistral's `[TOOL_CALLS] [{"name": .., "arguments": ..}]`
back into OpenAI `tool_calls`.

    tool_choice   prompt has tools   decoding                  output read as tool calls
    none          yes                [TOOL_CALLS] forbidden    never
    auto          yes                free                      if it starts with [TOOL_CALLS]
    required/any  yes                grammar: >= 1 call        always
    named         yes                grammar: that function    always
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from dataclasses import dataclass
from typing import Any

from api.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall, template_messages
from moe.errors import RequestError
from moe.guided import json_grammar, tool_call_grammar
from moe.tokenizer import Tokenizer

# Mistral's guardrail system prompt, prepended when a request sets safe_prompt (Mistral's API)
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
ID_CHARS = string.ascii_letters + string.digits
log = logging.getLogger("ray.serve")


@dataclass
class ChatPlan:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    grammar: str | None = None
    extra_bias: dict[int, float] | None = None
    tool_calls_token: int | None = None  # set when outputs starting with it are tool calls


def plan_chat(req: ChatCompletionRequest, tokenizer: Tokenizer) -> ChatPlan:
    messages = template_messages(req.messages)
    if req.safe_prompt:
        messages.insert(0, {"role": "system", "content": SAFE_PROMPT})
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or ("auto" if tools else "none")
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    plan = ChatPlan(messages, tools)
    if tools is None:
        if choice != "none":
            raise RequestError("tool_choice needs tools", param="tool_choice")
    else:
        token = tokenizer.tool_calls_token_id
        if token is None:
            raise RequestError("this model's tokenizer has no tool-call token", param="tools")
        if choice == "none":
            plan.extra_bias = {token: -100.0}
        elif wants_json and choice != "auto":
            raise RequestError(
                "response_format cannot be combined with a forced tool_choice", param="tool_choice"
            )
        else:
            plan.tool_calls_token = token
            if choice in ("required", "any") or isinstance(choice, NamedToolChoice):
                offered = tools
                if isinstance(choice, NamedToolChoice):
                    offered = [t for t in tools if t["function"]["name"] == choice.function.name]
                    if not offered:
                        raise RequestError(
                            f"tool_choice names {choice.function.name!r}, which is not in tools",
                            param="tool_choice",
                        )
                plan.grammar = tool_call_grammar(offered, token, req.parallel_tool_calls)
    if wants_json and plan.grammar is None:
        assert fmt is not None
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
        plan.grammar = json_grammar(schema)
    return plan


def new_tool_call_id() -> str:
    """Nine letters and digits: what Mistral's format expects back in the conversation."""
    return "".join(secrets.choice(ID_CHARS) for _ in range(9))


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The text after [TOOL_CALLS] → OpenAI tool_calls, or None when it is not a list of calls."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        args = c.get("arguments", {})
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append(
            ToolCall(id=new_tool_call_id(), function=FunctionCall(name=c["name"], arguments=arguments))
        )
    return out


def calls_of(text: str, parallel: bool) -> list[ToolCall] | None:
    """An output after [TOOL_CALLS] as calls (only the first unless parallel_tool_calls). One
    that is not a list of calls is dropped (None), never shown as content: a forced call's
    grammar always closes (moe.guided), so only a free ("auto") one can be malformed."""
    calls = parse_tool_calls(text)
    if calls is None:
        log.warning("dropped a malformed tool call (%d characters)", len(text))
    return calls if parallel or calls is None else calls[:1]
