"""Reasoning in the output, as Qwen3 and DeepSeek-R1 write it: `<think>…</think>` before the answer.

`ThinkTags.detect` finds the two tags as single tokens of the model's vocabulary (as vLLM's
`qwen3` reasoning parser needs them); a model without them has no reasoning parser. A choice's
text goes through a `ThinkSplitter`, whole or delta by delta with the same result (a stream's
reasoning and content deltas add up to the non-streamed fields): the text inside the tags is
`reasoning_content`, the rest `content`. Reasoning starts where the output opens with `<think>`,
or at once where the prompt left the tag open (a template that writes `<think>\n` itself); it
ends at `</think>`, and an output cut before that is all reasoning. The newlines the model
writes right after either tag are dropped. `inside_at_start` reads a prompt's last turn: with
`enable_thinking: false` Qwen3's template closes an empty `<think></think>` there, so
everything is content.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.tokenizer import Tokenizer

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ThinkTags:
    start_id: int
    end_id: int

    @classmethod
    def detect(cls, tokenizer: Tokenizer) -> ThinkTags | None:
        start, end = tokenizer.token_id(START), tokenizer.token_id(END)
        return cls(start, end) if start is not None and end is not None else None

    def inside_at_start(self, prompt: list[int]) -> bool:
        """Whether the prompt leaves the model inside a <think> block: the tag last opened in it
        is not closed (only the last turn can do that: earlier turns are closed)."""
        for t in reversed(prompt):
            if t == self.end_id:
                return False
            if t == self.start_id:
                return True
        return False


class ThinkSplitter:
    """One choice's text → (reasoning, content), fed whole or in deltas."""

    def __init__(self, inside: bool):
        self.state = "reasoning" if inside else "start"  # start → reasoning → content
        self.pending = ""  # text held back: a tag may be beginning, or newlines after a tag
        self.strip = inside  # drop the newlines that follow a tag

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """→ the (reasoning, content) text that can be shown now; `final`: nothing follows."""
        text = self.pending + text
        self.pending = ""
        reasoning, content = [], []
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if stripped.startswith(START):
                    self.state, self.strip = "reasoning", True
                    text = stripped[len(START) :]
                    continue
                if START.startswith(stripped) and not final:  # maybe a tag on its way
                    self.pending = text
                    break
                self.state = "content"
                continue
            if self.strip:
                text = text.lstrip("\n")
                if not text:
                    break
                self.strip = False
            if self.state == "content":
                content.append(text)
                break
            end = text.find(END)
            if end >= 0:
                reasoning.append(text[:end])
                self.state, self.strip = "content", True
                text = text[end + len(END) :]
                continue
            keep = 0 if final else partial_tag(text, END)  # a tag may be beginning at the end
            reasoning.append(text[: len(text) - keep])
            self.pending = text[len(text) - keep :]
            break
        if final and self.pending:
            (reasoning if self.state == "reasoning" else content).append(self.pending)
            self.pending = ""
        return "".join(reasoning), "".join(content)


def partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
