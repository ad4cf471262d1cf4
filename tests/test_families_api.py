"""The chat API on a Qwen3-MoE checkpoint (byte-level BPE, its own ChatML template, Hermes tool
calls, <think> reasoning) with the openai SDK over real HTTP, against the in-process engine (no
Ray: the API layer is the cluster's). Outputs the random weights cannot be relied on to write (a
<think> block, a free call) come from a scripted engine with the same tokenizer; what the grammar
forces (required and named calls, JSON after reasoning) from the real engine."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from api.chat_plan import ChatPlan, OutputParser
from api.reasoning import ThinkTags
from api.tool_parsers import HermesCalls
from tests.local_server import local_server
from tests.test_api import ScriptedEngine, make_client

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def qwen3(family_dirs):
    return family_dirs("qwen3_moe")


@pytest.fixture(scope="module")
def hf_tok(qwen3):
    return AutoTokenizer.from_pretrained(str(qwen3))


@pytest.fixture(scope="module")
def client(qwen3):
    with local_server(qwen3, served_model_name=["qwen"]) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def stream_text(client, **kw) -> tuple[str, str, list]:
    """(content, reasoning_content) added up from a stream's deltas, and its tool-call deltas."""
    content, reasoning, calls = "", "", []
    for chunk in client.chat.completions.create(model="qwen", stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        calls += d.tool_calls or []
    return content, reasoning, calls


def test_streamed_deltas_add_up_to_the_answer_also_for_chinese_and_emoji(client):
    """Byte-level BPE: a character is often several tokens; no delta holds half of one, and the
    deltas add up to the non-streamed text (the random model writes all kinds of bytes)."""
    for prompt in ("混合专家模型", "Emoji: 😀 🎉", "Hello"):
        kw = dict(messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0)
        whole = client.chat.completions.create(model="qwen", **kw).choices[0].message.content
        streamed, _, _ = stream_text(client, **kw)
        assert streamed == whole and len(whole) > 0
        done = client.completions.create(model="qwen", prompt=prompt, max_tokens=40, temperature=0)
        parts = client.completions.create(
            model="qwen", prompt=prompt, max_tokens=40, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in parts) == done.choices[0].text


def test_the_checkpoints_template_with_chat_template_kwargs(client, hf_tok):
    """enable_thinking false closes an empty <think> in the prompt (Qwen3's switch), as
    transformers renders it; continue_final_message continues the assistant's last message."""
    on = client.chat.completions.create(model="qwen", messages=ASK, max_tokens=1)
    off = client.chat.completions.create(
        model="qwen",
        messages=ASK,
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    want_on = hf_tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True)
    want_off = hf_tok.apply_chat_template(
        ASK, add_generation_prompt=True, tokenize=True, enable_thinking=False
    )
    assert on.usage.prompt_tokens == len(want_on["input_ids"]) and off.usage.prompt_tokens == len(
        want_off["input_ids"]
    )
    assert hf_tok.decode(want_off["input_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    partial = [*ASK, {"role": "assistant", "content": "It is"}]
    cont = client.chat.completions.create(
        model="qwen",
        messages=partial,
        max_tokens=1,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    want = hf_tok.apply_chat_template(partial, continue_final_message=True, tokenize=True)["input_ids"]
    assert cont.usage.prompt_tokens == len(want) and hf_tok.decode(want).endswith("It is")
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(
            model="qwen", messages=partial, extra_body={"continue_final_message": True}
        )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="qwen", messages=ASK, extra_body={"chat_template_kwargs": {"tokenize": 1}}
        )
    assert e.value.body["param"] == "chat_template_kwargs"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_in_hermes_format_always_validate(client, choice):
    """required / named: decoded under a grammar in the model's own <tool_call> format, so the
    calls parse and their arguments validate, whatever the weights; streamed as deltas too."""
    kw = dict(messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80, temperature=0)
    r = client.chat.completions.create(model="qwen", **kw)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    assert finish == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
        params = next(
            t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name
        )
        jsonschema.validate(json.loads(call.function.arguments), params)
    if isinstance(choice, dict):
        assert {c.function.name for c in message.tool_calls} == {"get_weather"}
    assert "<tool_call>" not in (message.content or "")
    content, _, deltas = stream_text(client, **kw)
    heads = [d for d in deltas if d.id]
    assert [h.function.name for h in heads] == [c.function.name for c in message.tool_calls]
    args = ["".join(d.function.arguments or "" for d in deltas if d.index == k) for k in range(len(heads))]
    assert args == [c.function.arguments for c in message.tool_calls]
    assert "<tool_call>" not in content


def test_a_tool_round_trip(client):
    """The call goes back with its result as a `tool` message; the template renders both."""
    first = (
        client.chat.completions.create(
            model="qwen", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
        )
        .choices[0]
        .message
    )
    call = first.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    r = client.chat.completions.create(
        model="qwen", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert (
        r.usage.prompt_tokens
        > client.chat.completions.create(
            model="qwen", messages=ASK, tools=TOOLS, max_tokens=1
        ).usage.prompt_tokens
    )


def test_json_after_reasoning_closes_within_max_tokens(client):
    """Structured output applies after the reasoning: with the prompt inside <think> (the
    assistant's message continued), the model reasons freely, then the closing path ends the
    reasoning and the JSON within max_tokens."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for max_tokens in (10, 30):
        r = client.chat.completions.create(
            model="qwen",
            messages=[*ASK, {"role": "assistant", "content": "<think>\nLet me see"}],
            max_tokens=max_tokens,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        m = r.choices[0].message
        assert r.usage.completion_tokens <= max_tokens and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(m.content), schema)
        if max_tokens == 30:  # room to reason: the model did, before its answer
            assert m.model_extra.get("reasoning_content")


def scripted(tok, pieces: list[str]):
    """The engine answers with these texts, one delta each (their tokens from the tokenizer)."""
    answer = [(tok.encode(p, add_special_tokens=False), p) for p in pieces]
    return ScriptedEngine(lambda r: answer)


THOUGHT = [
    "<think>",
    "\nThe user wants ",
    "the weather.\n",
    "</think>",
    "\n\n",
    "Let me check. ",
    "<tool_call>",
]
CALL = ['\n{"name": "get_weather", ', '"arguments": {"city": "巴黎", "days": 3}}\n', "</tool_call>"]


def test_reasoning_content_and_a_free_hermes_call_with_the_sdk(qwen3, hf_tok):
    with make_client(qwen3, scripted(hf_tok, THOUGHT + CALL)) as api:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
        kw = dict(model="tiny", messages=ASK, tools=TOOLS)
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        assert m.model_extra["reasoning_content"] == "The user wants the weather.\n"
        assert m.content == "Let me check. " and r.choices[0].finish_reason == "tool_calls"
        (call,) = m.tool_calls
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "巴黎", "days": 3}
        content, reasoning, deltas = "", "", []
        for chunk in client.chat.completions.create(stream=True, **kw):
            d = chunk.choices[0].delta
            content, reasoning = (
                content + (d.content or ""),
                reasoning + (d.model_extra.get("reasoning_content") or ""),
            )
            deltas += d.tool_calls or []
        assert (content, reasoning) == (m.content, m.model_extra["reasoning_content"])
        assert (
            deltas[0].function.name == "get_weather"
            and deltas[1].function.arguments == call.function.arguments
        )
        # the Responses API: a reasoning item, the message, the call
        out = client.responses.create(
            model="tiny", input="Weather?", tools=[{"type": "function", **TOOLS[0]["function"]}]
        )
        assert [i.type for i in out.output] == ["reasoning", "message", "function_call"]
        assert out.output[0].content[0].text == "The user wants the weather.\n"
        kinds = [e.type for e in client.responses.create(model="tiny", input="Weather?", stream=True)]
        assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
        assert "response.reasoning_text.done" in kinds and kinds[-1] == "response.completed"


def test_without_tools_a_call_in_the_text_is_text(qwen3, hf_tok):
    with make_client(qwen3, scripted(hf_tok, ["Plain ", "<tool_call>", "x"])) as api:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api, max_retries=0)
        m = client.chat.completions.create(model="tiny", messages=ASK).choices[0].message
        assert m.content == "Plain <tool_call>x" and not m.tool_calls


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nR1 混合 😀\n</think>\n\nAnswer 😀 done",
        "  <think>cut before the end",
        "No reasoning at all </think> here",
        '<think>a</think>b<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
        "text then <tool_ca",
    ],
)
def test_the_parser_gives_the_same_fields_delta_by_delta_as_whole(qwen3, hf_tok, text):
    """A stream's deltas (one per token here) add up to what the non-streamed answer holds."""
    plan = ChatPlan([], think=ThinkTags.detect(make_tok(qwen3)), tools=HermesCalls(0, 1))
    whole = OutputParser(plan).whole(text, [])
    p = OutputParser(plan)
    ids = hf_tok.encode(text, add_special_tokens=False)
    reasoning, content = "", ""
    shown = ""
    for k in range(len(ids)):
        piece = hf_tok.decode(ids[: k + 1])[len(shown) :]
        if piece.endswith("\ufffd"):
            continue
        shown += piece
        d = p.feed(piece, [])
        reasoning, content = reasoning + d.reasoning, content + d.content
    last = p.finish()
    assert (reasoning + last.reasoning, content + last.content) == (whole.reasoning, whole.content)
    assert (last.calls is None) == (whole.calls is None)


def make_tok(path):
    from moe.tokenizer import load_tokenizer

    return load_tokenizer(path)
