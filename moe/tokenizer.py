"""Tokenizers and chat formatting, and incremental detokenization for streaming.

Two modes, named as vLLM names them: `hf` uses the checkpoint's own tokenizer files and
`chat_template` through transformers; `mistral` uses mistral-common (Mistral's reference
tokenizer and chat format, with tool calls) from a `tokenizer.model.v*` file. `auto` picks
`mistral` when the directory holds such a file, else `hf`.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas without ever
emitting half a character (a byte-fallback token that is only part of a UTF-8 sequence is held
back until the rest arrives) and without losing SentencePiece's leading spaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from moe.errors import CheckpointError, RequestError

MISTRAL_FILE = re.compile(r"^(tokenizer\.model\.v\d+m?\d*|tekken\.json)$")


class Tokenizer(Protocol):
    mode: str
    bos_token_id: int | None
    eos_token_id: int
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template: ChatTemplateOptions | None = None,
    ) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def token_id(self, text: str) -> int | None:
        """The id of the one token whose text is `text` (<think>, <tool_call>), else None."""
        ...

    @property
    def special_ids(self) -> list[int]:
        """The control tokens (bos, eos, pad, <|im_start|>, ...): never text."""
        ...

    @property
    def tool_calls_token_id(self) -> int | None: ...


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How a chat is rendered, as vLLM's request fields say: `add_generation_prompt` (open the
    assistant's turn), `continue_final_message` (leave the last, an assistant's, open to be
    continued) and `kwargs`, the template's own variables (`{"enable_thinking": false}`)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)


# apply_chat_template's own parameters: a request's chat_template_kwargs may not set these
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "add_generation_prompt",
        "continue_final_message",
    }
)


class HFTokenizer:
    mode = "hf"

    def __init__(self, model_dir: str | Path):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:
            raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({e})") from None
        self.bos_token_id: int | None = self.tok.bos_token_id
        self.eos_token_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template: ChatTemplateOptions | None = None,
    ) -> list[int]:
        t = template or ChatTemplateOptions()
        if not self.tok.chat_template:
            raise RequestError("this model has no chat template; use /v1/completions", param="messages")
        if tools and "tools" not in self.tok.chat_template:
            raise RequestError(
                "this model's chat template does not support tools (no tool calling for this checkpoint)",
                param="tools",
            )
        try:
            out: Any = self.tok.apply_chat_template(
                messages,
                tools=cast(Any, tools or None),
                tokenize=True,
                add_generation_prompt=t.add_generation_prompt,
                continue_final_message=t.continue_final_message,
                **t.kwargs,
            )
        except Exception as e:  # jinja's raise_exception and template errors
            raise RequestError(
                f"messages do not fit the model's chat template: {e}", param="messages"
            ) from None
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a BatchEncoding in transformers 5
        return [int(t) for t in ids]

    def token_text(self, token_id: int) -> str:
        """One token as text for logprobs: its piece, with SentencePiece's '▁' as a space."""
        return str(self.tok.convert_ids_to_tokens(token_id)).replace("\u2581", " ")

    def token_id(self, text: str) -> int | None:
        ids = self.tok.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    @property
    def special_ids(self) -> list[int]:
        return sorted(set(self.tok.all_special_ids))

    @property
    def tool_calls_token_id(self) -> int | None:
        tid = self.tok.convert_tokens_to_ids("[TOOL_CALLS]")
        return tid if isinstance(tid, int) and tid != self.tok.unk_token_id else None


class MistralTokenizer:
    mode = "mistral"

    def __init__(self, path: str | Path):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as _MT

        try:
            self.mt = _MT.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load the Mistral tokenizer ({e})") from None
        self.raw = self.mt.instruct_tokenizer.tokenizer
        self.bos_token_id: int | None = self.raw.bos_id
        self.eos_token_id = self.raw.eos_id
        self.vocab_size = self.raw.n_words
        control_ids = set(range(self.raw.num_special_tokens)) | set(getattr(self.raw, "special_ids", ()))
        controls = {self.raw.id_to_piece(i): i for i in sorted(control_ids)}  # v1: <unk> <s> </s>
        self._controls = controls
        self._split = re.compile(
            "(" + "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) + ")"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A raw prompt's ids as transformers (and vLLM) encode it with the checkpoint's
        tokenizer.json: control tokens written in the text ([INST], </s>) are control tokens,
        and each run of text between them is encoded by SentencePiece (with its dummy prefix).
        Chat messages go through apply_chat_template, where text is always text."""
        ids = [self.raw.bos_id] if add_special_tokens else []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self._controls[part])
            elif part:
                ids.extend(self.raw.encode(part, bos=False, eos=False))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; with special tokens kept, each shows as its name ([INST], </s>) and the
        text between them as text (mistral-common's own KEEP would show raw pieces)."""
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        if skip_special_tokens:
            return self.raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        parts: list[str] = []
        run: list[int] = []
        for t in [*ids, None]:
            if t is not None and t >= self.raw.num_special_tokens:
                run.append(t)
                continue
            if run:
                lead = " " if self.raw.id_to_piece(run[0]).startswith("\u2581") else ""
                parts.append(lead + self.raw.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE))
                run = []
            if t is not None:
                parts.append(self.raw.id_to_piece(t))
        return "".join(parts)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        template: ChatTemplateOptions | None = None,
    ) -> list[int]:
        """Mistral's own format: no template variables; `continue_final_message` as mistral-common
        takes it (the generation prompt is always its own)."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        t = template or ChatTemplateOptions()
        try:
            req = ChatCompletionRequest.from_openai(
                messages, tools=tools or None, continue_final_message=t.continue_final_message
            )
            return list(self.mt.encode_chat_completion(req).tokens)
        except Exception as e:  # mistral-common validates roles and their order
            raise RequestError(f"invalid messages: {e}", param="messages") from None

    def token_text(self, token_id: int) -> str:
        return str(self.raw.id_to_piece(token_id)).replace("\u2581", " ")

    def token_id(self, text: str) -> int | None:
        return self._controls.get(text)

    @property
    def special_ids(self) -> list[int]:
        return sorted(self._controls.values())

    @property
    def tool_calls_token_id(self) -> int | None:
        from mistral_common.tokens.tokenizers.base import SpecialTokens

        try:
            return int(self.raw.get_special_token(SpecialTokens.tool_calls.value))
        except Exception:  # a tokenizer version without tool calls
            return None


def load_tokenizer(model_dir: str | Path, mode: str = "auto") -> Tokenizer:
    model_dir = Path(model_dir)
    mistral_files = (
        sorted(p for p in model_dir.iterdir() if MISTRAL_FILE.match(p.name)) if model_dir.is_dir() else []
    )
    if mode == "mistral" or (mode == "auto" and mistral_files):
        if not mistral_files:
            raise CheckpointError(
                f"{model_dir}: tokenizer_mode 'mistral' needs a tokenizer.model.v* or tekken.json"
            )
        return MistralTokenizer(mistral_files[-1])
    if mode not in ("auto", "hf"):
        raise ValueError(f"tokenizer_mode must be auto, hf or mistral, got {mode!r}")
    return HFTokenizer(model_dir)


class IncrementalDetokenizer:
    """Text deltas from a growing token list (the prefix/read-offset scheme vLLM uses)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-6:])  # a little context so the first token's space survives
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        """Append one token; return the new complete text (possibly empty)."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The output ended: what was held back (a UTF-8 sequence the tokens never completed,
        as a replacement character, where transformers' decode shows one too)."""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
