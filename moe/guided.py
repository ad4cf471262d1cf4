"""Guided (constrained) decoding: every sampled token must keep the output inside a grammar.

llguidance does the grammar work (chosen by measurement, benchmarks/guided_bench.py: ~2 ms to
compile a JSON schema and ~0.08 ms per token on this CPU, against ~100 ms / 0.08 ms for
xgrammar and ~8 s / 0.03 ms for outlines-core; and it needs neither torch nor triton, and is
what mistral-common's own guidance uses). raymix's part is which grammar a request gets:

- `json_grammar(schema)`: `response_format` json_schema / json_object. The schema is *bounded*
  first so that any model, even one with random weights, finishes its JSON: strings without a
  length limit get `maxLength`, arrays `maxItems`, numbers bounds (and at most 6 decimals),
  objects with named properties no extra keys, free-form objects short keys and a few entries,
  free-form values a small depth. A bounded schema only narrows the original: whatever it
  allows, the original allows, so the output validates against what the user sent.
- `tool_calls_grammar(tools, ...)`: forced calls in the model's format (api.tool_parsers: Mistral's
  `[TOOL_CALLS] [{"name": .., "arguments": {..}}]`, Hermes' `<tool_call>` blocks), the names
  restricted to the offered (or the named) functions and each call's arguments to that
  function's parameters schema (bounded the same way).
- `reasoning_prefix`: a `<think>` block before any of these (Qwen3), free text; structured output
  applies after it.

`GrammarMatcher` is one request's matcher: `fill_bitmask` before sampling, `fit_budget` on the
sampled token, `advance` after.

Structured output always closes within `max_tokens` (no other server does this; vLLM, SGLang
and OpenAI cut the JSON where the budget ends). A *closing path* is the completion a fixed
greedy rule writes from a state: at each step the first allowed of a priority list of
single-character tokens (`"`, `}`, `]`, `0`, `,`, `:`, digits, letters, ...), else the
grammar's forced or first allowed token, until the grammar accepts. Its length bounds the
shortest completion. A request whose grammar cannot close within `max_tokens` is refused (400,
param max_tokens). While decoding, a sampled token is kept only if a closing path after it
still fits the tokens left; otherwise the next most likely allowed tokens are tried, then the
closing path's own next token, which always fits. So every answer parses; the distribution is
changed only in the last steps before the budget, where it would otherwise be cut. The path is
kept from token to token, not re-walked: after a token, a tail of the last path almost always
still closes the grammar (one native validation), and only where none does is the walk redone.
Measured cost: benchmarks/guided_bench.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moe.errors import RequestError

STRING_MAX = 64
ARRAY_MAX = 8
MAP_MAX = 8
ANY_DEPTH = 2
INT_BOUND = 10**15
KEY_PATTERN = "^[A-Za-z0-9_]{1,24}$"
NO_WHITESPACE = {"whitespace_flexible": False}
# the closing path's preference: what ends strings, objects, arrays, then the shortest values
# (an object or array where one must start: after a reasoning block, before optional spaces)
CLOSERS = '"}]0,:{[' + "123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "-._ eE+"
THINK_END = "</think>"  # a reasoning block's end tag, where the vocabulary has it as one token
# tokens: a closing path longer than this counts as none, and such a grammar is refused (the
# greedy walk that finds one costs ~33 µs a step: bounded)
CLOSE_LIMIT = 256


def _any(depth: int) -> dict[str, Any]:
    """Any JSON value, nested at most `depth` deep, every part bounded."""
    scalars: list[dict[str, Any]] = [
        {"type": "string", "maxLength": STRING_MAX},
        {"type": "integer", "minimum": -INT_BOUND, "maximum": INT_BOUND},
        {"type": "number", "minimum": -INT_BOUND, "maximum": INT_BOUND, "multipleOf": 1e-6},
        {"type": "boolean"},
        {"type": "null"},
    ]
    if depth > 0:
        inner = _any(depth - 1)
        scalars += [
            {"type": "array", "items": inner, "maxItems": 4},
            {
                "type": "object",
                "patternProperties": {KEY_PATTERN: inner},
                "additionalProperties": False,
                "maxProperties": 4,
            },
        ]
    return {"anyOf": scalars}


def bound_schema(schema: Any, depth: int = ANY_DEPTH) -> Any:
    """A copy of `schema` that only admits JSON of bounded length (see the module docstring)."""
    if schema is True or schema == {}:
        return _any(depth)
    if not isinstance(schema, dict):
        return schema
    s = copy.copy(schema)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(s.get(key), list):
            s[key] = [bound_schema(x, depth) for x in s[key]]
    for key in ("$defs", "definitions", "properties", "patternProperties"):
        if isinstance(s.get(key), dict):
            s[key] = {k: bound_schema(v, depth) for k, v in s[key].items()}
    if isinstance(s.get("items"), dict) or s.get("items") is True:
        s["items"] = bound_schema(s["items"], max(depth - 1, 0))
    types = s.get("type")
    types = set(types) if isinstance(types, list) else {types} if types else set()
    constrained = any(k in s for k in ("enum", "const", "$ref", "anyOf", "oneOf", "allOf"))
    if not types and not constrained and not any(k in s for k in ("properties", "items")):
        return _any(depth) | {k: v for k, v in s.items() if k in ("description", "title")}
    if "string" in types and not any(k in s for k in ("maxLength", "enum", "const", "pattern", "format")):
        s["maxLength"] = max(STRING_MAX, s.get("minLength", 0))
    if types & {"integer", "number"}:
        s.setdefault("minimum", min(-INT_BOUND, s.get("maximum", 0) - INT_BOUND))
        s.setdefault("maximum", max(INT_BOUND, s["minimum"] + INT_BOUND))
        if "number" in types and "multipleOf" not in s:
            s["multipleOf"] = 1e-6
    if "array" in types and "maxItems" not in s and "prefixItems" not in s:
        s["maxItems"] = max(ARRAY_MAX, s.get("minItems", 0))
        s.setdefault("items", _any(max(depth - 1, 0)))
    if "object" in types:
        extra = s.get("additionalProperties", True)
        if "properties" in s:
            if extra is True:
                s["additionalProperties"] = False
        elif extra is not False and "patternProperties" not in s:
            value = _any(max(depth - 1, 0)) if extra is True else bound_schema(extra, max(depth - 1, 0))
            s["patternProperties"] = {KEY_PATTERN: value}
            s["additionalProperties"] = False
            s.setdefault("maxProperties", max(MAP_MAX, s.get("minProperties", 0)))
    return s


def _llg():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a declared dependency
        raise RequestError(
            "structured output needs the llguidance package", param="response_format"
        ) from None
    return llguidance


def json_grammar(schema: dict[str, Any] | None, prefix: str = "") -> str:
    """The grammar for `response_format`: JSON matching `schema` (any JSON object when None),
    compact, with one optional leading space (SentencePiece words start with one), after
    `prefix` (lark: a reasoning block, `reasoning_prefix`)."""
    bounded = bound_schema(schema) if schema is not None else bound_schema({"type": "object"}, ANY_DEPTH + 1)
    body = json.dumps({"x-guidance": NO_WHITESPACE, **bounded})
    return _lark(f'start: {prefix} " "? %json {body}\n', "response_format")


def reasoning_prefix(start: int, end: int, inside: bool, special: list[int]) -> str:
    """Lark for the reasoning before a constrained answer, in `<think>` tags (token ids `start`,
    `end`): any tokens but the end tag and the `special` ones (an eos must not end the answer
    inside its reasoning), then up to 4 newlines or spaces (bounded: the closing path must not
    write whitespace forever); optional unless the prompt already opened it (`inside`). The
    closing path ends it with the end tag (`GrammarTokenizer`)."""
    excluded = ",".join(str(t) for t in sorted({end, *special}))
    block = f"<[^{excluded}]>* <[{end}]> /[ \\n]{{0,4}}/"
    return block if inside else f"(<[{start}]> {block})?"


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema, bounded (an object with no properties where it has none)."""
    return bound_schema(tool["function"].get("parameters") or {"type": "object", "properties": {}})


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """One call of one of `tools`: {"name": its name, "arguments": its parameters (bounded)}."""
    defs: dict[str, Any] = {}
    calls = []
    for i, t in enumerate(tools):
        params = parameters_schema(t)
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": t["function"]["name"]},
                    "arguments": _rebase(params, i, defs),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {"x-guidance": NO_WHITESPACE, **one, **({"$defs": defs} if defs else {})}


def tool_calls_grammar(
    tools: list[dict[str, Any]], parallel: bool, prefix: str, head: str, tail: str, sep: str | None = None
) -> str:
    """The grammar for a forced tool call (`tool_choice` required or a named function), in the
    model's format, after `prefix` (lark: `reasoning_prefix`, or nothing): `head` (lark ending
    in `%json`), the calls' JSON, `tail`. With `sep` None the JSON is a list of 1-4 calls (1
    unless parallel: Mistral's `[TOOL_CALLS] [...]`); else each call is one JSON object in its
    own head...tail block, up to 4 joined by `sep` (Hermes' `<tool_call>` blocks)."""
    one = call_schema(tools)
    if sep is None:
        items = {k: v for k, v in one.items() if k not in ("x-guidance", "$defs")}
        array = {"x-guidance": NO_WHITESPACE, "type": "array", "items": items, "minItems": 1}
        array |= {"maxItems": 4 if parallel else 1, **({"$defs": one["$defs"]} if "$defs" in one else {})}
        return _lark(f"start: {prefix} {head} {json.dumps(array)}{tail}\n", "tools")
    more = f' ("{sep}" call){{0,3}}' if parallel else ""
    return _lark(f"start: {prefix} call{more}\ncall: {head} {json.dumps(one)}{tail}\n", "tools")


def named_calls_grammar(
    tools: list[dict[str, Any]],
    parallel: bool,
    prefix: str,
    call: Callable[[str], tuple[str, str]],
    begin: str,
    end: str,
    sep: str,
) -> str:
    """The grammar for a forced tool call in a format that writes each call's name outside its
    arguments' JSON (DeepSeek-V3's): `begin` (lark), 1 call (up to 4 joined by `sep` if
    parallel), `end`; `call(name)` is the lark before and after one function's arguments, which
    follow its parameters' schema (bounded)."""
    rules = []
    for i, t in enumerate(tools):
        params = parameters_schema(t)
        head, tail = call(t["function"]["name"])
        rules.append(f"call{i}: {head} %json {json.dumps({'x-guidance': NO_WHITESPACE, **params})} {tail}")
    more = f' ("{sep}" call){{0,3}}' if parallel else ""
    alternatives = " | ".join(f"call{i}" for i in range(len(tools)))
    body = f"start: {prefix} {begin} call{more} {end}\ncall: {alternatives}\n" + "\n".join(rules) + "\n"
    return _lark(body, "tools")


def _rebase(params: Any, index: int, defs: dict[str, Any]) -> Any:
    """Function `index`'s parameters schema, nested under a new root: its `$defs` /
    `definitions` (what pydantic writes for enums and nested models) move to `defs` as
    `f{index}.<name>`, and its local `$ref`s are rewritten to follow them; a `$ref` to its own
    root ("#", a recursive model) or into it points at a copy of that root in `defs`."""
    if not isinstance(params, dict):
        return params
    prefix = f"f{index}."
    refers_to_root = False

    def ref(pointer: str) -> str:
        nonlocal refers_to_root
        for section in ("/$defs/", "/definitions/"):
            if pointer.startswith(section):
                return f"#/$defs/{prefix}{pointer[len(section) :]}"
        refers_to_root = True
        return f"#/$defs/{prefix}root{pointer}"

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            out["$ref"] = ref(node["$ref"][1:])
        return out

    for section in ("definitions", "$defs"):
        for name, sub in (params.get(section) or {}).items():
            defs[f"{prefix}{name}"] = walk(sub)
    root = walk({k: v for k, v in params.items() if k not in ("$defs", "definitions")})
    if refers_to_root:
        defs[f"{prefix}root"] = root
    return root


def _lark(lark: str, param: str) -> str:
    llg = _llg()
    grammar = llg.LLMatcher.grammar_from_lark(lark)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:  # "at 1(8): failed to compile JSON schema: Invalid type: x\n<the grammar>": keep the why
        why = messages[0].split("\n", 1)[0].split(": ", 1)[-1] if messages else "invalid"
        raise RequestError(f"invalid {param} schema: {why}", param=param)
    return grammar


class GrammarTokenizer:
    """The model's vocabulary as llguidance sees it, built once per process (~0.3 s for 32k)."""

    def __init__(self, model_dir: Any, vocab_size: int, eos_token_id: int):
        llg = _llg()
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        hf = AutoTokenizer.from_pretrained(str(model_dir))
        if not isinstance(hf, PreTrainedTokenizerFast):
            raise RuntimeError(f"{model_dir}: guided decoding needs a fast tokenizer (tokenizer.json)")
        import llguidance.hf

        self.ll = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=eos_token_id)
        self.vocab_size = vocab_size
        self.eos = eos_token_id
        self.llg = llg
        single = [self.ll.tokenize_str(c) for c in CLOSERS]  # the tokens that are one character
        self.closers = [ids[0] for ids in single if len(ids) == 1]
        think_end = hf.encode(THINK_END, add_special_tokens=False)
        if len(think_end) == 1:  # a reasoning block is closed first (`reasoning_prefix`)
            self.closers.insert(0, think_end[0])

    def matcher(self, grammar: str, max_tokens: int | None = None) -> GrammarMatcher:
        """A matcher at the grammar's start; with `max_tokens`, refused (RequestError) when its
        closing path is longer than that."""
        m = self.llg.LLMatcher(self.ll, grammar, log_level=0)
        if m.is_error():
            raise RequestError(f"invalid grammar: {m.get_error()}", param="response_format")
        matcher = GrammarMatcher(m, self.vocab_size, self.closers, max_tokens, self.eos)
        if matcher.close_len > CLOSE_LIMIT:
            raise RequestError(
                f"the requested format's shortest complete answer is longer than {CLOSE_LIMIT} tokens "
                "(or has none), more than structured output takes here",
                param="response_format",
            )
        if max_tokens is not None and matcher.close_len > max_tokens:
            shortest = f"{matcher.close_len} tokens"
            raise RequestError(
                f"max_tokens is {max_tokens}, too few for a complete answer in the requested format "
                f"(the shortest takes {shortest}); raise max_tokens",
                param="max_tokens",
            )
        return matcher


class GrammarMatcher:
    """One request's position in its grammar, and a closing path from there: tokens that
    complete the grammar (`path`, kept while the request has a budget)."""

    def __init__(
        self,
        matcher: Any,
        vocab_size: int,
        closers: list[int] | None = None,
        max_tokens: int | None = None,
        eos: int = -1,  # the end-of-sequence token llguidance was given (-1: no closing paths)
    ):
        self.m = matcher
        self.vocab_size = vocab_size
        self.closers = closers or []
        self.eos = eos
        self.path = closing_path(self.m, self.closers, vocab_size)  # None: none within CLOSE_LIMIT
        self.left = max_tokens  # tokens left in the budget (None: unbounded)
        self._next: tuple[int, list[int] | None] | None = None  # (token, the path after it)

    @property
    def close_len(self) -> int:
        """Tokens of the closing path (more than CLOSE_LIMIT when there is none)."""
        return CLOSE_LIMIT + 1 if self.path is None else len(self.path)

    def fill_bitmask(self, bitmask: torch.Tensor) -> None:
        """bitmask: int32 [ceil(V / 32)] on the CPU, contiguous: bit t set ⇔ token t allowed."""
        self.m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)

    def fit_budget(self, token: int, alternatives: Callable[[], list[int]]) -> int:
        """`token` when the grammar can still be closed in the tokens left after it, else the
        first of `alternatives()` (allowed tokens, most likely first) that can, else the closing
        path's next token, which always can. Unbounded (no max_tokens): `token`."""
        if self.left is None or self.eos < 0:
            return token
        room = self.left - 1  # tokens left after this one
        path = self._path_after(token)
        if path is not None and len(path) <= room:
            self._next = (token, path)
            return token
        for t in alternatives():
            path = self._path_after(t)
            if path is not None and len(path) <= room:
                self._next = (t, path)
                return t
        if self.path is None:  # no closing path is known (longer than CLOSE_LIMIT): cut by length
            return token
        if not self.path:  # the grammar may end here: end it
            self._next = (self.eos, [])
            return self.eos
        self._next = (self.path[0], self.path[1:])
        return self.path[0]

    def advance(self, token_id: int) -> None:
        if not self.m.consume_token(token_id):
            raise RuntimeError(f"guided decoding: token {token_id} rejected ({self.m.get_error()})")
        known, self._next = self._next, None
        if self.left is None or self.eos < 0:
            return
        self.left -= 1
        self.path = known[1] if known is not None and known[0] == token_id else self._path_after(None)

    def _path_after(self, token: int | None) -> list[int] | None:
        """A closing path from the state after `token` (None: from the current state, the token
        already consumed). Usually a tail of the current path still closes the grammar there,
        found with one native validation each (~2 µs, ~10 µs for 250 tokens); else the greedy
        walk (~33 µs a token), as when the path was first measured. Never more per token."""
        head = [] if token is None else [token]
        if token == self.eos:
            return [] if self.m.validate_tokens(head) == 1 else None
        p = self.path or []
        if p and token == p[0]:
            return p[1:]
        for tail in (p[1:], p, *(p[j:] for j in range(2, min(len(p), TAILS) + 1))):
            if self.m.validate_tokens([*head, *tail, self.eos]) == len(head) + len(tail) + 1:
                return tail
        after = self.m.deep_copy()
        if token is not None and not after.consume_token(token):
            return None
        return closing_path(after, self.closers, self.vocab_size)

    @property
    def done(self) -> bool:
        return bool(self.m.is_stopped())


TAILS = 4  # a token spells a few of the closing path's characters at most: tails tried


def allowed_tokens(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids whose bit is set in an int32 bitmask [ceil(V / 32)] (llguidance's layout)."""
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size])


def closing_step(m: Any, closers: list[int], vocab_size: int) -> int:
    """The closing path's next token from m's state (m is not changed): the first of `closers`
    the grammar accepts (validated one by one: it accepts a closer that spells the start of a
    longer token the mask alone allows), else its forced token, else the first allowed one,
    found from the mask's lowest set bit (unpacking all V bits cost more than the rest)."""
    for t in closers:
        if m.validate_tokens([t]) == 1:
            return t
    forced = m.compute_ff_tokens()
    if forced:
        return int(forced[0])
    mask = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # [ceil(V / 32)]
    m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
    words = mask.view(np.uint32)
    nonzero = np.flatnonzero(words)
    if not len(nonzero):
        raise RuntimeError("guided decoding: the grammar allows no token")
    word = int(words[nonzero[0]])
    token = int(nonzero[0]) * 32 + (word & -word).bit_length() - 1  # its lowest set bit
    if token >= vocab_size:
        raise RuntimeError("guided decoding: the grammar allows no token")
    return token


def closing_path(m: Any, closers: list[int], vocab_size: int) -> list[int] | None:
    """The greedy rule's closing path from m's state ([] when the grammar may end here; None
    when it finds none within CLOSE_LIMIT tokens). m is not changed."""
    if m.is_accepting() or m.is_stopped():
        return []
    c, path = m.deep_copy(), []
    for _ in range(CLOSE_LIMIT):
        step = closing_step(c, closers, vocab_size)
        if not c.consume_token(step):
            return None
        path.append(step)
        if c.is_accepting() or c.is_stopped():
            return path
    return None


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [R, V] (any device), bitmask int32 [R, ceil(V / 32)] on the CPU: disallowed
    tokens get -inf, in place. The bits are unpacked on the logits' device."""
    rows, vocab = logits.shape
    mask = bitmask.to(logits.device, non_blocking=True)
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((mask[:, :, None] >> bits) & 1).reshape(rows, -1)[:, :vocab].bool()  # [R, V]
    logits.masked_fill_(~allowed, float("-inf"))
