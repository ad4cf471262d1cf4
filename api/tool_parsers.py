"""Tool calls in the model's own output format, one small parser per format (as vLLM's
`tool_parsers/`), chosen by the model's vocabulary:

    mistral   [TOOL_CALLS] [{"name": .., "arguments": {..}}, ...]        Mixtral 8x22B, Mistral v0.3
    hermes    <tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>  Qwen2.5/Qwen3, Hermes
    deepseek_v3  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
              ```json\n{..}\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>    DeepSeek-V3, R1

Each says how a call starts (so `tool_choice: none` can forbid it), the grammar a forced call
is decoded under (moe.guided: the names restricted to the offered functions, the arguments to
each one's parameters), and how to read calls back. A `CallStream` follows one choice's text:
it passes text through as content until a call starts, then holds the rest and reads the calls
when the output is complete (a stream sends them then, as tool-call deltas). A call that is not
valid JSON of a call (only a free, `auto`, one can be) is dropped with a warning, never shown as
content.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import uuid
from typing import Any, Protocol, cast

from api.protocol import FunctionCall, ToolCall
from api.reasoning import partial_tag
from moe.guided import named_calls_grammar, tool_calls_grammar
from moe.tokenizer import Tokenizer

log = logging.getLogger("ray.serve")
ID_CHARS = string.ascii_letters + string.digits


class ToolCallFormat(Protocol):
    name: str
    start_token: int  # the token a call starts with

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, prefix: str) -> str:
        """Lark for a forced call of one of `tools` (several if parallel), after `prefix`."""
        ...

    def starts(self, text: str, token_ids: list[int]) -> int | None:
        """Where a call starts in a choice's text so far (its first output tokens given), or None."""
        ...

    def parse(self, text: str) -> list[ToolCall] | None:
        """The calls in the text from where they start, or None when it is not calls."""
        ...


class MistralCalls:
    """Mistral's: the [TOOL_CALLS] control token (not in the decoded text), then a JSON list."""

    name = "mistral"

    def __init__(self, token: int):
        self.start_token = token

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, prefix: str) -> str:
        return tool_calls_grammar(tools, parallel, prefix, f'<[{self.start_token}]> " "? %json', "")

    def starts(self, text: str, token_ids: list[int]) -> int | None:
        return 0 if token_ids[:1] == [self.start_token] else None

    def parse(self, text: str) -> list[ToolCall] | None:
        try:
            calls = json.loads(text)
        except json.JSONDecodeError:
            return None
        return _calls([calls] if isinstance(calls, dict) else calls, _mistral_id)


class HermesCalls:
    """Hermes' (Qwen's): blocks of <tool_call>\\n{json}\\n</tool_call>, after any text."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)

    def __init__(self, start: int, end: int):
        self.start_token, self.end_token = start, end

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, prefix: str) -> str:
        head, tail = f'<[{self.start_token}]> "\\n" %json', f' "\\n" <[{self.end_token}]>'
        return tool_calls_grammar(tools, parallel, prefix, head, tail, "\\n")

    def starts(self, text: str, token_ids: list[int]) -> int | None:
        at = text.find(self.OPEN)
        return at if at >= 0 else None

    def parse(self, text: str) -> list[ToolCall] | None:
        try:
            calls = [json.loads(a or b) for a, b in self.BLOCK.findall(text)]
        except json.JSONDecodeError:
            return None
        return _calls(calls, _hermes_id)


class DeepSeekCalls:
    """DeepSeek-V3's (vLLM's `deepseek_v3` parser reads the same): the calls between
    <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>, each `<｜tool▁call▁begin｜>function<｜tool▁sep｜>`,
    the function's name, its arguments' JSON in a ```json block, `<｜tool▁call▁end｜>`."""

    name = "deepseek_v3"
    MARKERS = (
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁end｜>",
        "<｜tool▁call▁begin｜>",
        "<｜tool▁call▁end｜>",
        "<｜tool▁sep｜>",
    )
    OPEN = MARKERS[0]
    CALL = re.compile(
        r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>", re.DOTALL
    )

    def __init__(self, ids: list[int]):
        self.start_token = ids[0]
        self.ids = ids  # calls begin, calls end, call begin, call end, separator

    def grammar(self, tools: list[dict[str, Any]], parallel: bool, prefix: str) -> str:
        _, end, call_begin, call_end, sep = self.ids

        def call(name: str) -> tuple[str, str]:
            return (
                f'<[{call_begin}]> "function" <[{sep}]> {json.dumps(name)} "\\n```json\\n"',
                f'"\\n```" <[{call_end}]>',
            )

        return named_calls_grammar(
            tools, parallel, prefix, call, f"<[{self.start_token}]>", f"<[{end}]>", "\\n"
        )

    def starts(self, text: str, token_ids: list[int]) -> int | None:
        at = text.find(self.OPEN)
        return at if at >= 0 else None

    def parse(self, text: str) -> list[ToolCall] | None:
        calls = []
        for kind, name, arguments in self.CALL.findall(text):
            try:
                calls.append({"name": name.strip(), "arguments": json.loads(arguments)})
            except json.JSONDecodeError:
                return None
            if kind.strip() != "function":
                return None
        return _calls(calls, _hermes_id)


def detect(tokenizer: Tokenizer) -> ToolCallFormat | None:
    """The model's tool-call format, from its vocabulary; None if it has none."""
    if (token := tokenizer.tool_calls_token_id) is not None:
        return MistralCalls(token)
    deepseek = [tokenizer.token_id(m) for m in DeepSeekCalls.MARKERS]
    if all(t is not None for t in deepseek):
        return DeepSeekCalls(cast(list[int], deepseek))
    start, end = tokenizer.token_id(HermesCalls.OPEN), tokenizer.token_id(HermesCalls.CLOSE)
    if start is not None and end is not None:
        return HermesCalls(start, end)
    return None


class CallStream:
    """One choice's output after any reasoning: content up to where a call starts, then calls."""

    def __init__(self, fmt: ToolCallFormat | None, parallel: bool):
        self.fmt, self.parallel = fmt, parallel
        self.text = ""  # everything so far
        self.ids: list[int] = []
        self.sent = 0  # characters of text already given as content
        self.call_at: int | None = None

    def feed(self, text: str, token_ids: list[int]) -> str:
        """→ the content that can be shown now. Where calls may follow text, whitespace at its end
        waits for what follows: whitespace alone before a call is no content (as vLLM gives it)."""
        self.text += text
        self.ids += token_ids
        if self.fmt is not None and self.call_at is None:
            self.call_at = self.fmt.starts(self.text, self.ids)
        if self.call_at is not None:  # the text before the call, unless it is only whitespace
            before = self.text[: self.call_at]
            out = before[self.sent :] if before.strip() else ""
            self.sent = max(self.sent, self.call_at)
            return out
        end = len(self.text)
        if isinstance(self.fmt, HermesCalls | DeepSeekCalls):
            end -= partial_tag(self.text, self.fmt.OPEN)  # a tag may be on its way
            end = self.sent + len(self.text[self.sent : end].rstrip())
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall] | None]:
        """The output is complete → (content not yet shown, the calls or None)."""
        if self.fmt is None or self.call_at is None:
            rest, self.sent = self.text[self.sent :], len(self.text)
            return rest, None
        calls = self.fmt.parse(self.text[self.call_at :])
        if calls is None:
            log.warning("dropped a malformed tool call (%d characters)", len(self.text) - self.call_at)
        return "", calls if self.parallel or calls is None else calls[:1]


def _calls(raw: Any, new_id: Any) -> list[ToolCall] | None:
    if not isinstance(raw, list) or not raw:
        return None
    out = []
    for c in raw:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            return None
        args = c.get("arguments", {})
        arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        out.append(ToolCall(id=new_id(), function=FunctionCall(name=c["name"], arguments=arguments)))
    return out


def _mistral_id() -> str:
    """Nine letters and digits: what Mistral's format expects back in the conversation."""
    return "".join(secrets.choice(ID_CHARS) for _ in range(9))


def _hermes_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's
