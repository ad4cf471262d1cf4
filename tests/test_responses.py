"""POST /v1/responses with the openai SDK itself (`responses.create`, `stream=True` and the
`responses.stream` helper) over real HTTP, against the in-process engine (no Ray: the API layer
is the same under the cluster). The Responses API is the chat path in another shape, so its
greedy answers are checked against chat's for the same conversation."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.local_server import local_server

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]


@pytest.fixture(scope="module")
def url(tiny_dir):
    with local_server(tiny_dir, served_model_name=["tiny"]) as url:
        yield url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def chat_answer(client: openai.OpenAI, messages: list, **kw) -> str:
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
    return r.choices[0].message.content


def test_plain_answer_is_chats_and_incomplete_when_cut(client):
    r = client.responses.create(
        model="tiny", input="Hello", instructions="Be brief.", max_output_tokens=8, temperature=0
    )
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.output_text == chat_answer(client, system, max_tokens=8)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 8 and r.usage.total_tokens == r.usage.input_tokens + 8
    assert r.store is False and r.instructions == "Be brief." and r.max_output_tokens == 8
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"


def test_stream_is_the_responses_event_sequence(client):
    events = list(
        client.responses.create(model="tiny", input="Hello", max_output_tokens=6, temperature=0, stream=True)
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # cut by max_output_tokens
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-4].text == events[-1].response.output_text
    assert (
        text
        == client.responses.create(
            model="tiny", input="Hello", max_output_tokens=6, temperature=0
        ).output_text
    )


def test_stream_helper_with_structured_output(client):
    """`responses.stream` accumulates the events into the final response; text.format
    json_schema is decoded under the same grammar as chat's, so it closes and completes."""
    fmt = {"format": {"type": "json_schema", "name": "n", "schema": SCHEMA, "strict": True}}
    with client.responses.stream(model="tiny", input="A number", text=fmt, max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    assert isinstance(json.loads(final.output_text)["n"], int)
    assert final.text.format.type == "json_schema"


def test_tool_round_trip(client):
    """A forced call comes back as a function_call item (streamed too); its output goes back as
    a function_call_output item, and the answer is chat's for the same conversation."""
    r = client.responses.create(
        model="tiny",
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    assert "city" in json.loads(call.arguments)
    with client.responses.stream(
        model="tiny",
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        argument_deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    assert {o.type for o in final.output} == {"function_call"}  # parallel calls allowed here
    assert argument_deltas == [o.arguments for o in final.output]
    follow = client.responses.create(
        model="tiny",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"},
        ],
        tools=TOOLS,
        max_output_tokens=8,
        temperature=0,
    )
    calls = [
        {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 24 C"},
    ]
    assert follow.output_text == chat_answer(client, messages, tools=CHAT_TOOLS, max_tokens=8)
    assert follow.usage.input_tokens > r.usage.input_tokens  # the call and its output were in the prompt


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"input": "x", "previous_response_id": "resp_abc"}, 400, "previous_response_id"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools.0"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "what is this?"},
                            {"type": "input_image", "image_url": "https://example.com/a.png"},
                        ],
                    }
                ]
            },
            400,
            "input.0.content.1",
        ),
        ({"input": "x" * 20000}, 400, "input"),  # longer than the context
        # what the chat request it becomes refuses: 400s naming the parameter, never 500s
        ({"input": "x", "tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools.0.function.name"),
        ({"input": [{"role": "user", "content": "x"}] * 2049}, 400, "input"),
        ({"input": "x", "model": "gpt-17"}, 404, "model"),
    ],
)
def test_refusals_name_the_parameter(url, body, status, param):
    r = httpx.post(f"{url}/v1/responses", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_nothing_is_stored(url):
    r = httpx.get(f"{url}/v1/responses/resp_123", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
