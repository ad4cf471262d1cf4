"""The hosted Mixtral APIs' own examples (../shared/seeds: Baseten, NVIDIA NIM, DeepInfra,
Mistral) run against a live raymix, changed only in base URL, key and (where the example names
another model) the model alias; plus structured output, tool calling and prefix caching over
real HTTP. One Ray cluster and one deployment for the module."""

from __future__ import annotations

import json
import shutil

import httpx
import jsonschema
import openai
import pytest
import requests

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.sampling import SamplingParams
from tests.cluster_harness import Raymix, free_port, metric, ray_cluster

KEY = "sk-raymix-compat"
PRICE = 0.07  # $ per million tokens, DeepInfra's listed price for the example's model
ALIASES = [
    "raymix-tiny-mixtral",
    "mistral-7b",  # Baseten's examples
    "mistralai/mixtral-8x22b-instruct-v0.1",  # NVIDIA NIM's default
    "mistralai/Mistral-7B-Instruct-v0.2",  # DeepInfra's examples
    "mixtral-8x7b",  # Mistral's
]
MISTRAL_CONVERSATION = [
    {"role": "user", "content": "What is a mistral?"},
    {
        "role": "assistant",
        "content": "A mistral is a type of cold, dry wind that blows across the southern slopes of the Alps from "
        "the Valais region of Switzerland into the Ligurian Sea near Genoa. It is known for its strong and steady "
        "gusts, sometimes reaching up to 60 miles per hour.",
    },
    {"role": "user", "content": "How does the mistral wind form?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(tiny_dir, tmp_path_factory):
    """The embedded model with generation defaults in its generation_config.json (as NIM's)."""
    d = tmp_path_factory.mktemp("nim") / "model"
    shutil.copytree(tiny_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps(gen | {"temperature": 0.5, "max_new_tokens": 24}))
    return d


@pytest.fixture(scope="module")
def url(model_dir):
    with ray_cluster():
        rm = Raymix(free_port())
        rm.deploy(  # the APIs' examples: the experts in the router (the cluster tests shard them)
            model=str(model_dir),
            expert_shards=0,
            served_model_name=ALIASES,
            api_key=[KEY],
            max_model_len=4096,
            kv_cache_memory_mb=128,
            override_generation_config={"max_new_tokens": 20},
            input_price_per_million=PRICE,
            output_price_per_million=PRICE,
        )
        yield rm.url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=180)


# ---- Baseten ----


def test_baseten_openai_streaming_example(client):
    res = client.chat.completions.create(
        model="mistral-7b", messages=MISTRAL_CONVERSATION, temperature=0.9, max_tokens=512, stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in res if chunk.choices]
    assert all(p is None or isinstance(p, str) for p in pieces)
    assert "".join(p or "" for p in pieces).strip()


def test_baseten_openai_non_streaming_example(client):
    res = client.chat.completions.create(
        model="mistral-7b", messages=MISTRAL_CONVERSATION, temperature=0.9, max_tokens=512
    )
    assert isinstance(res.choices[0].message.content, str) and res.choices[0].message.content
    assert res.model == "mistral-7b" and res.choices[0].finish_reason in ("stop", "length")
    assert 0 < res.usage.completion_tokens <= 512


def test_baseten_rest_examples(url):
    headers = {"Authorization": f"Api-Key {KEY}"}
    data = {"messages": MISTRAL_CONVERSATION, "stream": True, "max_new_tokens": 512, "temperature": 0.9}
    res = requests.post(f"{url}/production/predict", headers=headers, json=data, stream=True, timeout=180)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    streamed = b"".join(content for content in res.iter_content())
    assert streamed.decode("utf-8").strip()

    data["stream"] = False
    res = requests.post(f"{url}/predict", headers=headers, json=data, timeout=180)  # the alias
    assert res.status_code == 200
    output = res.json()["output"]  # the conversation as the model saw it, then the answer
    assert output.startswith("<s>[INST] What is a mistral?[/INST] A mistral is a type of cold")
    assert "</s>[INST] How does the mistral wind form?[/INST]" in output
    assert len(output.split("How does the mistral wind form?[/INST]", 1)[1]) > 0

    bad = requests.post(f"{url}/production/predict", headers={"Authorization": "Api-Key wrong"}, json=data)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"


# ---- NVIDIA NIM ----


def test_nim_every_documented_parameter_and_defaults(url):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {
        "messages": [{"role": "user", "content": "Write a limerick about the wonders of GPU computing."}],
        "max_tokens": 16,
        "stream": False,
        "temperature": 0.5,
        "top_p": 1,
        "stop": ["\n\n", "END"],
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "seed": 0,
    }
    r = httpx.post(
        f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120
    )  # no model: the default
    assert r.status_code == 200, r.text
    assert r.json()["model"] == ALIASES[0] and r.json()["usage"]["completion_tokens"] <= 16
    again = httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=120).json()
    assert again["choices"][0]["message"] == r.json()["choices"][0]["message"]  # seed 0 reproduces

    # generation defaults: the checkpoint says 24 new tokens, the operator's override 20
    del body["max_tokens"]
    body |= {"model": "mistralai/mixtral-8x22b-instruct-v0.1", "stop": None, "extra": None}
    r = httpx.post(
        f"{url}/v1/chat/completions", headers=headers, json=body | {"ignore_eos": True}, timeout=120
    )
    assert (
        r.json()["usage"]["completion_tokens"] == 20 and r.json()["choices"][0]["finish_reason"] == "length"
    )

    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", headers=headers, json=body | {"stream": True}, timeout=120
    ) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(ln[6:])["object"] == "chat.completion.chunk" for ln in lines[:-1])


# ---- DeepInfra ----


def _deepinfra(url: str, body: dict, stream: bool = False):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    if not stream:
        return httpx.post(f"{url}/v1/chat/completions", headers=headers, json=body, timeout=180)
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json=body, timeout=180) as s:
        return [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]


def test_deepinfra_examples_and_estimated_cost(url):
    r = _deepinfra(
        url,
        {"model": "mistralai/Mistral-7B-Instruct-v0.2", "messages": [{"role": "user", "content": "Hello!"}]},
    )
    assert r.status_code == 200
    j = r.json()
    assert (
        j["id"].startswith("chatcmpl-") and j["object"] == "chat.completion" and isinstance(j["created"], int)
    )
    assert j["model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert j["choices"][0]["message"]["role"] == "assistant" and j["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    u = j["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert u["estimated_cost"] == pytest.approx(u["total_tokens"] * PRICE / 1e6)

    conversation = [
        {"role": "system", "content": "Respond like a michelin starred chef."},
        {"role": "user", "content": "Can you name at least two different techniques to cook lamb?"},
        {
            "role": "assistant",
            "content": 'Bonjour! ... First, we have the classic "Sous Vide" method. Next, "Sous le Sable".',
        },
        {"role": "user", "content": "Tell me more about the second method."},
    ]
    r = _deepinfra(url, {"model": "mixtral-8x7b", "messages": conversation})  # example's Llama → an alias
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 40

    events = _deepinfra(
        url,
        {
            "model": "mistralai/Mistral-7B-Instruct-v0.2",
            "stream": True,
            "messages": [{"role": "user", "content": "Hello!"}],
        },
        stream=True,
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert (
        chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        and chunks[-1]["choices"][0]["delta"] == {}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"top_p": 0.01},
        {"top_p": 1},
        {"max_tokens": 0},
        {"max_tokens": 64},
        {"stop": [f"stop{i}" for i in range(16)]},
        {"n": 2},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"presence_penalty": 2, "frequency_penalty": -2},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.8},
        {"response_format": {"type": "json_object"}},
        {"tools": TOOLS},
        {"tools": TOOLS, "tool_choice": "none"},
        {"tools": TOOLS, "tool_choice": "auto"},
    ],
)
def test_deepinfra_input_fields_within_their_ranges(url, fields):
    body = {"model": "mistralai/Mistral-7B-Instruct-v0.2", "messages": [{"role": "user", "content": "Hi"}]}
    r = _deepinfra(url, body | {"max_tokens": 12} | fields)
    assert r.status_code == 200, r.text
    j = r.json()
    assert len(j["choices"]) == fields.get("n", 1)
    if fields.get("max_tokens") == 0:
        assert j["choices"][0]["message"]["content"] == "" and j["usage"]["completion_tokens"] == 0
    if "response_format" in fields:  # closed within max_tokens, whatever the weights
        assert isinstance(json.loads(j["choices"][0]["message"]["content"]), dict)
        too_few = _deepinfra(url, body | fields | {"max_tokens": 3})
        assert too_few.status_code == 400 and too_few.json()["error"]["param"] == "max_tokens"
    if fields.get("tool_choice") == "none":
        assert "tool_calls" not in j["choices"][0]["message"]
    events = _deepinfra(
        url,
        body | {"max_tokens": 6 if "response_format" not in fields else 12, "stream": True} | fields,
        stream=True,
    )
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)


def test_deepinfra_n2_with_streaming(url):
    body = {
        "model": "mistral-7b",
        "messages": [{"role": "user", "content": "Hi"}],
        "n": 2,
        "max_tokens": 5,
        "seed": 1,
    }
    events = [json.loads(e) for e in _deepinfra(url, body | {"stream": True}, stream=True)[:-1]]
    assert {c["choices"][0]["index"] for c in events} == {0, 1}


# ---- Mistral's SDK ----


def test_mistral_sdk_complete_stream_seed_and_safe_prompt(url):
    from mistralai import Mistral

    client = Mistral(api_key=KEY, server_url=url)
    resp = client.chat.complete(
        model="mixtral-8x7b", messages=[{"role": "user", "content": "Hello from Mixtral 8x7B"}]
    )
    assert isinstance(resp.choices[0].message.content, str) and resp.usage.total_tokens > 0

    def say(seed: int, safe: bool = False):
        r = client.chat.complete(
            model="mixtral-8x7b",
            messages=[{"role": "user", "content": "Hello"}],
            temperature=1.0,
            max_tokens=8,
            random_seed=seed,
            safe_prompt=safe,
        )
        return r.choices[0].message.content, r.usage.prompt_tokens

    (a, n_plain), (b, _), (c, _) = say(7), say(7), say(8)
    assert a == b and a != c  # random_seed is the seed
    _, n_safe = say(7, safe=True)
    from api.chat_plan import SAFE_PROMPT

    expected = httpx.post(
        f"{url}/tokenize",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"messages": [{"role": "system", "content": SAFE_PROMPT}, {"role": "user", "content": "Hello"}]},
        timeout=60,
    ).json()["count"]
    assert n_safe == expected > n_plain  # the guardrail prompt went in front

    text = ""
    for event in client.chat.stream(
        model="mixtral-8x7b",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        random_seed=7,
        temperature=1.0,
    ):
        text += event.data.choices[0].delta.content or ""
    assert text == a

    r = client.chat.complete(
        model="mixtral-8x7b",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice="any",
        temperature=0,
        max_tokens=200,
    )
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


# ---- tool calling through the OpenAI SDK ----


def test_tool_call_round_trip_and_streaming_deltas(client):
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(
        model="raymix-tiny-mixtral",
        messages=messages,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=200,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls[:1]
    assert call.type == "function" and call.function.name == "get_weather" and len(call.id) == 9
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, TOOLS[0]["function"]["parameters"])

    follow_up = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature": 22, "unit": args["unit"]}),
        },
    ]
    answer = client.chat.completions.create(
        model="raymix-tiny-mixtral", messages=follow_up, tools=TOOLS, temperature=0, max_tokens=12
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")

    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(
        model="raymix-tiny-mixtral",
        messages=messages,
        tools=TOOLS,
        tool_choice=named,
        temperature=0,
        max_tokens=200,
    )
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += d.id or ""
            c["name"] += (d.function.name or "") if d.function else ""
            c["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (w.function.name, w.function.arguments) for w in whole
    ]
    assert all(len(c["id"]) == 9 for c in calls.values())


def test_tool_choice_errors_are_400s(client):
    messages = [{"role": "user", "content": "x"}]
    cases = [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (
            dict(
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nah"}}}],
                tool_choice="required",
            ),
            "tools",
        ),
        (
            dict(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            ),
            "response_format",
        ),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="raymix-tiny-mixtral", messages=messages, max_tokens=4, **kw)
        assert e.value.body["param"] == param, e.value.body
    assert client.chat.completions.create(
        model="raymix-tiny-mixtral", messages=messages, max_tokens=2
    ).choices


# ---- structured output over HTTP ----


def test_json_schema_responses_validate(client):
    schemas = [
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
            "required": ["name", "age"],
        },
        {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2},
        {
            "type": "object",
            "properties": {
                "order": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "format": "uuid"}, "total": {"type": "number"}},
                    "required": ["id", "total"],
                }
            },
            "required": ["order"],
        },
    ]
    for i, schema in enumerate(schemas):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        kw = dict(
            model="raymix-tiny-mixtral",
            messages=[{"role": "user", "content": "JSON please"}],
            response_format=fmt,
            max_tokens=2000,
            seed=i,
        )
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(stream=True, **kw)
            if c.choices
        )
        assert streamed == r.choices[0].message.content  # same seed, same JSON


# ---- aliases and prefix caching ----


def test_every_alias_is_served(client):
    assert [m.id for m in client.models.list().data] == ALIASES
    for name in ALIASES:
        assert (
            client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=1
            ).model
            == name
        )


def test_second_turn_reuses_the_first_turns_kv_blocks(url, client, model_dir):
    """Over HTTP: the second request of a conversation finds the first's blocks (the hit counter
    rises by at least the first prompt's full blocks) and answers exactly as without caching."""
    headers = {"Authorization": f"Bearer {KEY}"}
    hits0 = metric(url, "raymix:prefix_cache_hits_total", headers)
    turn1 = [
        {"role": "user", "content": "Tell me about the mistral wind and where it blows, in detail please."}
    ]
    kw = dict(model="raymix-tiny-mixtral", temperature=0, max_tokens=16)
    a1 = client.chat.completions.create(messages=turn1, **kw)
    turn2 = [
        *turn1,
        {"role": "assistant", "content": a1.choices[0].message.content},
        {"role": "user", "content": "And in winter?"},
    ]
    hits1 = metric(url, "raymix:prefix_cache_hits_total", headers)
    a2 = client.chat.completions.create(messages=turn2, **kw)
    hits2 = metric(url, "raymix:prefix_cache_hits_total", headers)
    block = 16
    assert hits2 - hits1 >= block * (a1.usage.prompt_tokens // block) > 0
    assert hits1 - hits0 < a1.usage.prompt_tokens  # the first turn itself was not (all) cached
    assert (
        metric(url, "raymix:prefix_cache_queries_total", headers)
        >= a1.usage.prompt_tokens + a2.usage.prompt_tokens
    )

    off = LLMEngine.from_pretrained(model_dir, EngineConfig(max_model_len=4096, enable_prefix_caching=False))
    for turn, got in [(turn1, a1), (turn2, a2)]:
        (seq,) = off.generate(
            [off.tokenizer.apply_chat_template(turn)], SamplingParams(max_tokens=16, temperature=0)
        )
        assert seq.text == got.choices[0].message.content
