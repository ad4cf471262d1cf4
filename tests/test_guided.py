"""Guided decoding without Ray: whatever the weights (the embedded model's are random), output
under a JSON schema parses and validates against the schema the user sent; forced tool calls
parse into calls whose arguments validate; the fast bitmask path equals a plain loop."""

from __future__ import annotations

import enum
import json

import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from api.tool_parsers import MistralCalls
from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.errors import RequestError
from moe.guided import GrammarMatcher, apply_bitmask, bound_schema, json_grammar
from moe.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=4096, max_num_seqs=16))


def _prompt(engine, text="Answer in JSON."):
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": text}])


# ---- a strategy for realistic schemas: objects of typed, sometimes constrained, properties ----

names = st.sampled_from(["id", "name", "age", "email", "tags", "price", "active", "items", "meta", "city"])
scalar = st.one_of(
    st.builds(
        lambda lo, span: {"type": "string", "minLength": lo, "maxLength": lo + span},
        st.integers(0, 3),
        st.integers(0, 20),
    ),
    st.just({"type": "string"}),
    st.just({"type": "string", "format": "date"}),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-50, 50),
        st.integers(0, 1000),
    ),
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.builds(lambda lo: {"type": "number", "minimum": lo, "exclusiveMaximum": lo + 10}, st.integers(-5, 5)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.sampled_from(["red", "green", "blue", "a b", "ü"]), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}
    ),
    st.just({"type": ["string", "null"]}),
)


def objects(children):
    return st.dictionaries(names, children, min_size=1, max_size=4).flatmap(
        lambda props: st.builds(
            lambda req, extra: (
                {"type": "object", "properties": props, "required": req}
                | ({"additionalProperties": False} if extra else {})
            ),
            st.lists(st.sampled_from(sorted(props)), unique=True),
            st.booleans(),
        )
    )


schemas = st.recursive(
    scalar,
    lambda inner: st.one_of(
        objects(inner),
        st.builds(
            lambda items, lo: {"type": "array", "items": items, "minItems": lo},
            inner,
            st.integers(0, 2),
        ),
        st.just({"type": "object"}),
    ),
    max_leaves=8,
).filter(lambda s: s.get("type") in ("object", "array"))


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schema=schemas, temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16))
def test_output_under_a_random_schema_parses_and_validates(engine, schema, temperature, seed):
    jsonschema.Draft202012Validator.check_schema(schema)
    params = SamplingParams(max_tokens=3000, temperature=temperature, seed=seed, grammar=json_grammar(schema))
    (seq,) = engine.generate([_prompt(engine)], params)
    assert seq.finish_reason == "stop", (schema, seq.text)
    jsonschema.validate(json.loads(seq.text), schema)


def test_json_object_mode_gives_an_object(engine):
    params = [
        SamplingParams(max_tokens=3000, temperature=1.0, seed=s, grammar=json_grammar(None)) for s in range(6)
    ]
    for seq in engine.generate([_prompt(engine)] * 6, params):
        assert seq.finish_reason == "stop"
        assert isinstance(json.loads(seq.text), dict)


def test_guided_and_free_requests_share_a_batch(engine):
    """A guided row does not disturb its unguided neighbours (same greedy tokens as alone)."""
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = engine.generate([_prompt(engine, "hello")], free)[0].output_token_ids
    guided = SamplingParams(max_tokens=500, temperature=0.0, grammar=json_grammar({"type": "object"}))
    mixed = engine.generate([_prompt(engine), _prompt(engine, "hello")], [guided, free])
    assert mixed[1].output_token_ids == alone
    json.loads(mixed[0].text)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    },
]


def tool_call_grammar(tools, token):
    """Mistral's forced-call grammar ([TOOL_CALLS] and a JSON list of calls), as chat builds it."""
    return MistralCalls(token).grammar(tools, True, "")


@pytest.mark.parametrize("offered", [TOOLS, TOOLS[1:]])
def test_forced_tool_calls_parse_and_validate(engine, offered):
    tok = engine.tokenizer
    token = tok.tool_calls_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris, and 2+3?"}], TOOLS)
    params = [
        SamplingParams(max_tokens=2000, temperature=t, seed=s, grammar=tool_call_grammar(offered, token))
        for t, s in [(0.0, None), (1.0, 1), (1.0, 2)]
    ]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in offered}
    for seq in engine.generate([prompt] * 3, params):
        assert seq.finish_reason == "stop" and seq.output_token_ids[0] == token
        calls = json.loads(seq.text)
        assert calls and all(c["name"] in by_name for c in calls)
        for c in calls:
            jsonschema.validate(c["arguments"], by_name[c["name"]])


def test_malformed_schemas_are_request_errors():
    for bad in [{"type": "objekt"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}]:
        with pytest.raises(RequestError) as e:
            json_grammar(bad)
        assert e.value.param == "response_format"
    bad_tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]
    with pytest.raises(RequestError) as e:
        tool_call_grammar(bad_tool, 5)
    assert e.value.param == "tools"


@settings(max_examples=200, deadline=None, derandomize=True)
@given(schema=schemas, value=st.from_regex(r"\A[0-9a-z]{0,3}\Z") | st.integers() | st.none())
def test_bounded_schema_only_narrows(schema, value):
    """Whatever the bounded schema accepts, the original accepts."""
    bounded = bound_schema(schema)
    for candidate in (value, {"id": value}, [value], {}):
        if jsonschema.Draft202012Validator(bounded).is_valid(candidate):
            assert jsonschema.Draft202012Validator(schema).is_valid(candidate), (schema, bounded, candidate)


def test_apply_bitmask_matches_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    vocab, rows = 100, 3
    logits = torch.randn(rows, vocab, generator=g)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), generator=g, dtype=torch.int64
    ).to(torch.int32)
    want = logits.clone()
    for r in range(rows):
        for t in range(vocab):
            word = int(bitmask[r, t // 32]) & 0xFFFFFFFF
            if not (word >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    got = logits.clone()
    apply_bitmask(got, bitmask)
    assert torch.equal(got, want)


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(BaseModel):
    city: str
    zip: str | None = None


class Order(BaseModel):
    """What pydantic writes for these uses `$defs` and `$ref`: an Enum, a nested model, an
    Optional of a model, a list of models; a recursive model refers to its own root."""

    color: Color
    ship_to: Address
    bill_to: Address | None = None
    items: list[Address] = Field(max_length=3)


class Tree(BaseModel):
    label: str = Field(max_length=8)
    children: list[Tree] = Field(max_length=2)


@pytest.mark.parametrize("model", [Order, Tree])
@pytest.mark.parametrize("how", ["openai", "pydantic"])
def test_forced_tool_calls_with_defs_and_refs(engine, model, how):
    """Tool schemas as the openai SDK's pydantic_function_tool and instructor send them."""
    if how == "openai":
        tool = openai.pydantic_function_tool(model)
    else:  # instructor's Mode.TOOLS: the model's own model_json_schema() as the parameters
        tool = {
            "type": "function",
            "function": {"name": model.__name__, "parameters": model.model_json_schema()},
        }
    assert "$defs" in tool["function"]["parameters"] or "$ref" in json.dumps(tool)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Order something."}], [tool])
    params = [
        SamplingParams(
            max_tokens=3000, temperature=t, seed=s, grammar=tool_call_grammar([tool], tok.tool_calls_token_id)
        )
        for t, s in [(0.0, None), (1.0, 1), (1.0, 2)]
    ]
    for seq in engine.generate([prompt] * 3, params):
        assert seq.finish_reason == "stop", seq.text
        for call in json.loads(seq.text):
            model.model_validate(call["arguments"])
            jsonschema.validate(call["arguments"], tool["function"]["parameters"])


CLOSING_CASES = {
    "json_object": json_grammar(None),
    "json_schema": json_grammar(
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "color": {"enum": ["red", "green"]},
                "n": {"type": "integer"},
            },
            "required": ["name", "tags", "color", "n"],
        }
    ),
}


@pytest.mark.parametrize("case", [*CLOSING_CASES, "tools"])
def test_structured_output_closes_within_every_max_tokens(engine, case, monkeypatch):
    """Whatever the budget, from the shortest complete answer's length up, the output parses
    (random weights wander: without closing most of these would be cut mid-JSON); below it the
    request is refused, naming max_tokens."""
    tok = engine.tokenizer
    if case == "tools":
        grammar = tool_call_grammar(TOOLS, tok.tool_calls_token_id)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], TOOLS)
    else:
        grammar, prompt = CLOSING_CASES[case], _prompt(engine)
    shortest = engine.grammar_tokenizer().matcher(grammar).close_len
    assert 2 <= shortest < 60
    with pytest.raises(RequestError) as e:
        engine.add_request("short", prompt, SamplingParams(max_tokens=shortest - 1, grammar=grammar))
    assert e.value.param == "max_tokens"
    budgets = list(range(shortest, shortest + 24))
    params = [SamplingParams(max_tokens=b, temperature=1.0, seed=b, grammar=grammar) for b in budgets]
    seqs = engine.generate([prompt] * len(budgets), params)
    for b, seq in zip(budgets, seqs, strict=True):
        assert seq.num_output_tokens <= b
        value = json.loads(seq.text)  # parses, whatever the budget
        if case == "tools":
            assert seq.output_token_ids[0] == tok.tool_calls_token_id
            assert all(c["name"] in ("get_weather", "add") for c in value)
        elif case == "json_schema":
            assert set(value) == {"name", "tags", "color", "n"}
    monkeypatch.setattr(GrammarMatcher, "fit_budget", lambda self, token, alternatives: token)  # closing off
    cut = [s.finish_reason == "length" for s in engine.generate([prompt] * len(budgets), params)]
    assert sum(cut) >= len(budgets) // 5


def test_the_closing_path_is_kept_from_token_to_token_not_rewalked(engine, monkeypatch):
    """A format whose shortest answer is 202 tokens, with just that budget: every token is
    near the budget's end, yet the closing path is walked (~33 µs a step, ~7 ms for this one)
    about once per request, not once per token per sequence as before: after each token a tail
    of the last path is validated instead. The answers match the pattern, within max_tokens."""
    import re

    import moe.guided

    grammar = json_grammar({"type": "string", "pattern": "^[~!]{200}$"})
    shortest = engine.grammar_tokenizer().matcher(grammar).close_len
    walks = []
    walk = moe.guided.closing_path
    monkeypatch.setattr(moe.guided, "closing_path", lambda *a: walks.append(1) or walk(*a))
    params = [SamplingParams(max_tokens=shortest, temperature=1.0, seed=s, grammar=grammar) for s in range(4)]
    seqs = engine.generate([_prompt(engine)] * 4, params)
    tokens = sum(s.num_output_tokens for s in seqs)
    for seq in seqs:
        assert seq.num_output_tokens <= shortest and re.fullmatch("[~!]{200}", json.loads(seq.text))
    assert tokens > 4 * 80 and len(walks) - 4 < tokens / 20, (len(walks), tokens)  # 4: the matchers'
