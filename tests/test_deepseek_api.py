"""The chat API on a DeepSeek-V3 checkpoint (DeepSeek's special tokens and chat format, its
tool-call markers, R1's <think> reasoning) with the openai SDK over real HTTP, against the
in-process engine (no Ray: the API layer is the cluster's). What the random weights cannot be
relied on to write (a <think> block, a free call) comes from a scripted engine with the same
tokenizer; what the grammar forces (required and named calls) from the real engine."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from api.tool_parsers import DeepSeekCalls, detect
from moe.tokenizer import load_tokenizer
from tests.local_server import local_server
from tests.test_api import ScriptedEngine, make_client
from tests.test_families_api import ASK, TOOLS

BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"


@pytest.fixture(scope="module")
def deepseek(family_dirs):
    return family_dirs("deepseek_v3")


@pytest.fixture(scope="module")
def hf_tok(deepseek):
    return AutoTokenizer.from_pretrained(str(deepseek))


@pytest.fixture(scope="module")
def client(deepseek):
    with local_server(deepseek, served_model_name=["deepseek"]) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_deepseeks_format_is_detected_from_its_vocabulary(deepseek):
    fmt = detect(load_tokenizer(deepseek))
    assert isinstance(fmt, DeepSeekCalls) and fmt.name == "deepseek_v3"


def test_the_prompt_is_deepseeks_chat_format_as_transformers_renders_it(client, hf_tok):
    """The begin-of-sentence token, <｜User｜>, <｜Assistant｜>; `thinking` (V3.1's switch,
    R1's default) opens <think> in the prompt."""
    for kwargs in ({}, {"thinking": True}):
        r = client.chat.completions.create(
            model="deepseek", messages=ASK, max_tokens=1, extra_body={"chat_template_kwargs": kwargs}
        )
        want = hf_tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True, **kwargs)[
            "input_ids"
        ]
        assert r.usage.prompt_tokens == len(want)
        text = hf_tok.decode(want)
        assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>What is the weather")
        assert text.endswith("<｜Assistant｜><think>\n" if kwargs else "<｜Assistant｜>")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_in_deepseeks_format_always_validate(client, choice):
    """required / named: decoded under a grammar in DeepSeek-V3's own format (markers, the
    name after <｜tool▁sep｜>, the arguments in a ```json block), so they parse and validate
    whatever the weights; streamed as deltas too; no marker reaches the content."""
    kw = dict(messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=300, temperature=0)
    r = client.chat.completions.create(model="deepseek", **kw)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        params = next(
            t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name
        )
        jsonschema.validate(json.loads(call.function.arguments), params)
    if isinstance(choice, dict):
        assert {c.function.name for c in message.tool_calls} == {"get_weather"}
    assert BEGIN not in (message.content or "")
    deltas, content = [], ""
    for chunk in client.chat.completions.create(model="deepseek", stream=True, **kw):
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            content += chunk.choices[0].delta.content or ""
    heads = [d for d in deltas if d.id]
    assert [h.function.name for h in heads] == [c.function.name for c in message.tool_calls]
    assert BEGIN not in content


THOUGHT = ["\nThe user wants ", "the weather.\n", "</think>", "\n\n", "Let me check."]
CALL = [
    BEGIN,
    "<｜tool▁call▁begin｜>",
    "function",
    "<｜tool▁sep｜>",
    "get_weather\n```json\n",
    '{"city": "巴黎", "days": 3}',
    "\n```",
    "<｜tool▁call▁end｜>",
    END,
]


def test_r1s_reasoning_and_a_free_deepseek_call_with_the_sdk(deepseek, hf_tok):
    """The prompt opens <think> (`thinking`): what the model writes up to </think> is
    reasoning_content, then content, then a call in DeepSeek's format, parsed into tool_calls,
    streamed the same."""
    answer = [(hf_tok.encode(p, add_special_tokens=False), p) for p in THOUGHT + CALL]
    with make_client(deepseek, ScriptedEngine(lambda r: answer)) as api:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
        kw = dict(
            model="tiny", messages=ASK, tools=TOOLS, extra_body={"chat_template_kwargs": {"thinking": True}}
        )
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        assert m.model_extra["reasoning_content"] == "The user wants the weather.\n"
        assert m.content == "Let me check." and r.choices[0].finish_reason == "tool_calls"
        (call,) = m.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "巴黎", "days": 3}
        content, reasoning, deltas = "", "", []
        for chunk in client.chat.completions.create(stream=True, **kw):
            d = chunk.choices[0].delta
            content += d.content or ""
            reasoning += d.model_extra.get("reasoning_content") or ""
            deltas += d.tool_calls or []
        assert (content, reasoning) == (m.content, m.model_extra["reasoning_content"])
        assert (
            deltas[0].function.name == "get_weather"
            and deltas[1].function.arguments == call.function.arguments
        )
