"""What a chat request asks of its output, and reading its output back.

`plan_chat` turns the messages, `tools`, `tool_choice`, `response_format`, the template options
(`chat_template_kwargs`, `add_generation_prompt`, `continue_final_message`) and Mistral's
`safe_prompt` into what the engine needs: the prompt's token ids, the grammar (moe.guided) that
forced tool calls and JSON output are decoded under, and a bias that keeps `tool_choice: none`
from calling. The model's own formats decide the rest: its tool-call format (api.tool_parsers:
Mistral's [TOOL_CALLS] or Hermes' <tool_call>) and, where its vocabulary has <think> tags, its
reasoning (api.reasoning), which comes first and is free: the grammar applies after it.

    tool_choice   prompt has tools   decoding                  output read as tool calls
    none          yes                the call's start forbidden  never
    auto          yes                free                      where a call starts
    required/any  yes                grammar: >= 1 call        always
    named         yes                grammar: that function    always

`OutputParser` reads one choice's text, whole or delta by delta with the same result:
reasoning, content, then the calls once the output is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from api.protocol import ChatCompletionRequest, NamedToolChoice, ToolCall, template_messages
from api.reasoning import ThinkSplitter, ThinkTags
from api.tool_parsers import CallStream, ToolCallFormat, detect
from moe.errors import RequestError
from moe.guided import json_grammar, reasoning_prefix
from moe.tokenizer import RESERVED_TEMPLATE_KWARGS, ChatTemplateOptions, Tokenizer

# Mistral's guardrail system prompt, prepended when a request sets safe_prompt (Mistral's API)
SAFE_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)


@dataclass
class ChatPlan:
    prompt: list[int]
    grammar: str | None = None
    extra_bias: dict[int, float] | None = None
    tools: ToolCallFormat | None = None  # set when the output may hold calls
    think: ThinkTags | None = None  # the model's reasoning tags
    think_open: bool = False  # the prompt leaves the model inside <think>
    parallel: bool = True

    def parser(self) -> OutputParser:
        return OutputParser(self)


def template_options(req: ChatCompletionRequest) -> ChatTemplateOptions:
    kwargs = dict(req.chat_template_kwargs or {})
    reserved = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if reserved:
        raise RequestError(f"chat_template_kwargs may not set {reserved[0]!r}", param="chat_template_kwargs")
    if req.continue_final_message and req.add_generation_prompt:
        raise RequestError(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise RequestError(
            "continue_final_message needs the last message to be the assistant's", param="messages"
        )
    return ChatTemplateOptions(req.add_generation_prompt, req.continue_final_message, kwargs)


def plan_chat(req: ChatCompletionRequest, tokenizer: Tokenizer) -> ChatPlan:
    """Runs off the event loop: the chat template and a schema's compilation take time. The
    request's tools and schema are checked first (a bad one is a 400 naming them), the prompt
    is rendered, then the grammar built for what the prompt leaves open (a <think> block)."""
    messages = template_messages(req.messages)
    if req.safe_prompt:
        messages.insert(0, {"role": "system", "content": SAFE_PROMPT})
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or ("auto" if tools else "none")
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    calls: ToolCallFormat | None = None
    grammar: Callable[[str], str] | None = None  # the grammar after a given (reasoning) prefix
    extra_bias = None
    if tools is None:
        if choice != "none":
            raise RequestError("tool_choice needs tools", param="tool_choice")
    else:
        calls = detect(tokenizer)
        if calls is None:
            raise RequestError(
                "this model has no tool-call format (its vocabulary has no call tokens)", param="tools"
            )
        if choice == "none":
            extra_bias, calls = {calls.start_token: -100.0}, None
        elif wants_json and choice != "auto":
            raise RequestError(
                "response_format cannot be combined with a forced tool_choice", param="tool_choice"
            )
        elif choice in ("required", "any") or isinstance(choice, NamedToolChoice):
            offered = tools
            if isinstance(choice, NamedToolChoice):
                offered = [t for t in tools if t["function"]["name"] == choice.function.name]
                if not offered:
                    raise RequestError(
                        f"tool_choice names {choice.function.name!r}, which is not in tools",
                        param="tool_choice",
                    )
            forced, chosen = calls, offered

            def grammar(prefix: str) -> str:
                return forced.grammar(chosen, req.parallel_tool_calls, prefix)

    if wants_json and grammar is None:
        assert fmt is not None
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None

        def grammar(prefix: str) -> str:
            return json_grammar(schema, prefix)

    compiled = grammar("") if grammar is not None else None  # a bad schema: refused before the template
    prompt = tokenizer.apply_chat_template(messages, tools, template_options(req))
    think = ThinkTags.detect(tokenizer)
    plan = ChatPlan(prompt, compiled, extra_bias, calls, think, parallel=req.parallel_tool_calls)
    if think is not None:
        plan.think_open = think.inside_at_start(prompt)
        if grammar is not None:  # the reasoning comes first: the grammar lets it
            prefix = reasoning_prefix(think.start_id, think.end_id, plan.think_open, tokenizer.special_ids)
            plan.grammar = grammar(prefix)
    return plan


@dataclass
class Parsed:
    reasoning: str = ""
    content: str = ""
    calls: list[ToolCall] | None = None


class OutputParser:
    """One choice's output: `feed` each delta (text and token ids) → what can be shown now;
    `finish` when it is complete → the rest, with the tool calls."""

    def __init__(self, plan: ChatPlan):
        self.think = ThinkSplitter(plan.think_open) if plan.think is not None else None
        self.calls = CallStream(plan.tools, plan.parallel)

    def feed(self, text: str, token_ids: list[int]) -> Parsed:
        reasoning, rest = self.think.feed(text) if self.think is not None else ("", text)
        if self.think is not None and self.think.state != "content":
            token_ids = []  # tokens of the reasoning: a call's start is looked for after it
        return Parsed(reasoning, self.calls.feed(rest, token_ids))

    def finish(self) -> Parsed:
        reasoning, rest = self.think.feed("", final=True) if self.think is not None else ("", "")
        content = self.calls.feed(rest, [])
        more, calls = self.calls.finish()
        return Parsed(reasoning, content + more, calls)

    def whole(self, text: str, token_ids: list[int]) -> Parsed:
        """A finished output at once: the same fields as its deltas add up to."""
        first, last = self.feed(text, token_ids), self.finish()
        return Parsed(first.reasoning + last.reasoning, first.content + last.content, last.calls)
