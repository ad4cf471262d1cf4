"""The HTTP layer without Ray: the app from api.app.build_api, in this process.

Most tests run the real engine in-process (LocalEngineClient around an AsyncEngine on the tiny
checkpoint); the few whose outputs the random weights cannot produce on demand (a tool call,
an overload, a lost engine, a request that never ends) use a scripted engine host. Behaviour
that needs Ray (placement, faults, the data plane) is tested in test_cluster and beside it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from api.app import build_api
from api.context import ServingContext
from api.engine_client import LocalEngineClient, Outputs
from api.errors import EngineUnavailable
from api.metrics import ServingMetrics
from cluster.config import RaymixSettings
from cluster.messages import GenerateRequest, ModelInfo, Refusal, RouterStats
from moe.engine.async_engine import AsyncEngine
from moe.engine.llm_engine import EngineConfig, EngineStats, LLMEngine
from moe.engine.sequence import RequestOutput
from moe.sampling import SamplingParams
from moe.tokenizer import load_tokenizer

KEY = "sk-api-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def make_client(model_dir, engine, root_path: str = "", **settings) -> TestClient:
    s = RaymixSettings(model=str(model_dir), served_model_name=["tiny"], **settings)
    ctx = ServingContext(s, engine, load_tokenizer(model_dir), {}, ServingMetrics())
    return TestClient(build_api(ctx), raise_server_exceptions=False, root_path=root_path)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = AsyncEngine(lambda: LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=256)))
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def api(tiny_dir, engine):
    with make_client(
        tiny_dir, LocalEngineClient(engine), api_key=[KEY], max_request_body_bytes=65536,
        input_price_per_million=1.0, output_price_per_million=2.0,
    ) as client:  # fmt: skip
        yield client


def post(api: TestClient, body, path="/v1/chat/completions", headers=AUTH, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return api.post(path, content=content, headers={"Content-Type": "application/json", **headers}, **kw)


def events(r: httpx.Response) -> list:
    """The SSE data lines of a response, JSON-decoded but for [DONE]."""
    data = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_json"),
        ({"max_tokens": 3}, 400, "messages", None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
        ({**GOOD, "temperature": 7}, 400, "temperature", None),
        ({**GOOD, "n": 0}, 400, "n", None),
        ({**GOOD, "logit_bias": {"x": 1}}, 400, "logit_bias", None),
        ({**GOOD, "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
        ({**GOOD, "model": "gpt-17"}, 404, "model", "model_not_found"),
        (b"[" + b"1," * 40000 + b"1]", 413, None, "request_too_large"),
        (b"[" * 30000 + b"]" * 30000, 400, None, "invalid_json"),  # nested past the depth limit
        (b"[" * 129 + b'"' + b'\\"' * 30000, 400, None, "invalid_json"),  # an unclosed string: linear scan
        (b'{"messages": ' + b"[" * 129 + b"]" * 129 + b"}", 400, None, "invalid_json"),
    ],
)
def test_bad_input_gets_openai_errors(api, body, status, param, code):
    r = post(api, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)
    assert post(api, GOOD).status_code == 200  # and the server keeps serving


def test_body_limit_holds_without_content_length_and_curl_form_type_is_read_as_json(api):
    chunks = (b"x" * 8192 for _ in range(10))  # chunked: no Content-Length to trust
    r = api.post("/v1/chat/completions", content=chunks, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    form = {"Content-Type": "application/x-www-form-urlencoded", **AUTH}  # what curl -d sends
    assert api.post("/v1/chat/completions", content=json.dumps(GOOD), headers=form).status_code == 200


def test_api_keys_guard_the_api_not_health_or_docs(api):
    assert post(api, GOOD, headers={}).status_code == 401
    r = post(api, GOOD, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post(api, GOOD, headers={"Authorization": f"Api-Key {KEY}"}).status_code == 200  # Baseten's
    assert api.get("/v1/models").status_code == 401
    assert [m["id"] for m in api.get("/v1/models", headers=AUTH).json()["data"]] == ["tiny"]
    # every route needs the key but the public ones: liveness, metrics, the page and the docs
    for path in ("/health", "/metrics", "/openapi.json", "/docs", "/", "/ui/app.js"):
        assert api.get(path).status_code == 200, path
    for path in ("/version", "/experts", "/v1/models/tiny", "/v1/responses/resp_1", "/v1/nope"):
        r = api.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert api.get("/version", headers=AUTH).status_code == 200


def test_an_admin_key_alone_rebalances_and_expert_status_is_shared(tiny_dir, engine, monkeypatch):
    """--admin-api-key: /experts/rebalance takes only it (a user's key gets 401); /experts, which
    asks every router and shard, is answered from one call a second however many clients ask
    (the second stretched to an hour here, so the count does not depend on the machine's speed)."""
    from api import app as app_module

    monkeypatch.setattr(app_module, "EXPERTS_CACHE_S", 3600.0)
    calls = []
    client = LocalEngineClient(engine)
    status = client.expert_status

    async def counted():
        calls.append(1)
        return await status()

    client.expert_status = counted  # type: ignore[method-assign]
    with make_client(tiny_dir, client, api_key=[KEY], admin_api_key=["sk-admin"]) as api:
        assert api.post("/experts/rebalance", headers=AUTH).status_code == 401
        admin = {"Authorization": "Bearer sk-admin"}
        assert api.post("/experts/rebalance", headers=admin).status_code == 200
        assert api.get("/experts", headers=admin).status_code == 401  # the admin key is for admin routes
        answers = [api.get("/experts", headers=AUTH) for _ in range(20)]
        assert all(a.status_code == 200 for a in answers) and len(calls) == 1


@pytest.mark.parametrize("prefix", ["/raymix", "/a/b"])
def test_keys_and_body_limits_hold_behind_a_route_prefix(tiny_dir, engine, prefix):
    """Behind a Serve route_prefix (or an http_options.root_path) the app sees root_path set and
    full paths: the key and the body limits apply to the path it routes on."""
    with make_client(
        tiny_dir, LocalEngineClient(engine), root_path=prefix, api_key=[KEY], max_request_body_bytes=65536
    ) as client:
        url = f"{prefix}/v1/chat/completions"
        r = client.post(url, json=GOOD)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get(f"{prefix}/v1/models").status_code == 401
        big = {**GOOD, "messages": [{"role": "user", "content": "x" * 70000}]}
        r = client.post(url, json=big, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert client.post(url, json=GOOD, headers=AUTH).status_code == 200
        assert client.get(f"{prefix}/health").status_code == 200


def test_unknown_paths_and_wrong_methods_are_openai_errors(api):
    r = api.get("/v1/nope", headers=AUTH)
    assert r.status_code == 404
    assert r.json() == {
        "error": {"message": "Invalid URL (GET /v1/nope)", "type": "invalid_request_error",
                  "param": None, "code": "not_found"}
    }  # fmt: skip
    r = api.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "GET /v1/chat/completions" in r.json()["error"]["message"]


def test_stream_equals_non_stream_with_sse_framing_and_usage(api):
    body = {**GOOD, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    whole = post(api, body).json()
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["role"] == "assistant"
    usage = whole["usage"]
    assert usage["completion_tokens"] == 8 and usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert usage["estimated_cost"] == pytest.approx((usage["prompt_tokens"] * 1.0 + 8 * 2.0) / 1e6)
    r = post(api, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    ev = events(r)
    assert ev[-1] == "[DONE]" and ev[-2]["choices"] == [] and ev[-2]["usage"] == usage
    chunks = ev[:-2]
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    plain = events(post(api, {**body, "stream": True}))
    assert all("usage" not in c for c in plain[:-1])  # no usage key at all unless asked for


def test_n_choices_and_completions_with_echo_and_logprobs(api):
    r = post(api, {**GOOD, "n": 3, "temperature": 0, "max_tokens": 4}).json()
    texts = [c["message"]["content"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and len(set(texts)) == 1  # greedy: all alike
    prompt = "Once upon a time"
    c = post(
        api,
        {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
        "/v1/completions",
    )
    choice = c.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    n_prompt = c.json()["usage"]["prompt_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts <s>
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert all(
        len(top) <= 3 and max(top.values()) >= v and v in top.values()
        for top, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:], strict=True)
    )
    ids = post(api, {"prompt": prompt}, "/tokenize").json()["tokens"]
    scored = post(
        api, {"prompt": ids, "max_tokens": 0, "logprobs": 1, "echo": True}, "/v1/completions"
    ).json()["choices"][0]  # the prompt only, as lm-eval scores it
    assert scored["finish_reason"] == "length" and scored["text"] == prompt
    assert scored["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:n_prompt], abs=1e-5)
    streamed = events(post(api, {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2,
                                 "echo": True, "stream": True}, "/v1/completions"))  # fmt: skip
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == choice["text"]
    tokens = [t for e in streamed[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert tokens == lp["tokens"]
    many = post(api, {"prompt": [prompt, "x"], "max_tokens": 2, "n": 2}, "/v1/completions").json()
    assert len(many["choices"]) == 4
    assert post(api, {"prompt": [prompt, "x"], "stream": True}, "/v1/completions").status_code == 400


def test_chat_logprobs_shape(api):
    r = post(api, {**GOOD, "logprobs": True, "top_logprobs": 3, "temperature": 0}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the top one


def test_tokenize_detokenize_predict_and_zero_max_tokens(api):
    tok = post(api, {"prompt": "Hello world"}, "/tokenize").json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert post(api, {"tokens": tok["tokens"]}, "/detokenize").json() == {"prompt": "Hello world"}
    assert post(api, {"tokens": [10**9]}, "/detokenize").json()["error"]["param"] == "tokens"
    out = post(api, {"messages": GOOD["messages"], "max_new_tokens": 3}, "/production/predict").json()
    assert out["output"].startswith("<s>") and "hi" in out["output"]
    streamed = post(api, {"messages": GOOD["messages"], "max_new_tokens": 3, "stream": True}, "/predict")
    assert streamed.headers["content-type"].startswith("text/plain")
    zero = post(api, {**GOOD, "max_tokens": 0}).json()
    assert zero["choices"][0]["finish_reason"] == "length" and zero["usage"]["completion_tokens"] == 0


def test_metrics_count_what_was_served(api):
    def scrape() -> dict[str, float]:
        lines = api.get("/metrics").text.splitlines()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and line[0] != "#")}

    before = scrape()
    post(api, {**GOOD, "max_tokens": 5, "ignore_eos": True})
    post(api, {**GOOD, "max_tokens": 5, "ignore_eos": True, "stream": True})
    post(api, {**GOOD, "temperature": 9})
    after = scrape()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("raymix:generation_tokens_total") == 10
    assert delta("raymix:e2e_request_latency_seconds_count") == 2
    assert delta("raymix:time_to_first_token_seconds_count") == 1  # the stream
    assert delta("raymix:inter_token_latency_seconds_count") == 8  # every token after a first
    assert delta('raymix:request_success_total{finished_reason="length"}') == 2
    assert delta('raymix:request_errors_total{status="400"}') == 1


def test_openapi_documents_requests_and_responses(api):
    doc = api.get("/openapi.json").json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest"
    )
    ok = chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("ChatCompletionResponse")
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert {"/v1/completions", "/v1/models", "/tokenize", "/production/predict"} <= set(doc["paths"])


# ---- a scripted engine host: outputs the random weights would not give on demand ----


class ScriptedEngine:
    """Answers every request with `script(request)`: a list of (token ids, text) deltas, the last
    finishing it; or a Refusal; `None` never answers; an exception is raised by submit."""

    def __init__(self, script):
        self.script = script
        self.aborted: list[str] = []

    def submit(self, requests: list[GenerateRequest]) -> Outputs:
        outputs = Outputs([r.request_id for r in requests], self.aborted.extend)
        for r in requests:
            answer = self.script(r)
            if isinstance(answer, Exception):
                raise answer
            if isinstance(answer, Refusal):
                outputs.put([answer])
                continue
            for k, (ids, text) in enumerate(answer or []):
                last = k == len(answer) - 1
                n = sum(len(i) for i, _ in answer[: k + 1])
                out = RequestOutput(r.request_id, ids, text, [], last, "stop" if last else None, None, 3, n)
                outputs.put([out])
        return outputs

    async def model_info(self) -> ModelInfo:
        return ModelInfo(True, 256, 0)

    async def stats(self) -> list[RouterStats]:
        return [RouterStats(engine=EngineStats(), ready=True)]

    async def expert_load(self) -> list:
        return []


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_calls_json_and_streamed_as_deltas(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    call = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = [([tok.tool_calls_token_id], ""), ([5, 6], call[:20]), ([7], call[20:])]
    with make_client(tiny_dir, ScriptedEngine(lambda r: script)) as api:
        body = {**GOOD, "tools": TOOLS}
        choice = post(api, body, headers={}).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (tc,) = choice["message"]["tool_calls"]
        assert tc["type"] == "function" and len(tc["id"]) == 9
        assert tc["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        chunks = events(post(api, {**body, "stream": True}, headers={}))[:-1]
        deltas = [c["choices"][0]["delta"] for c in chunks]
        head, args = deltas[1]["tool_calls"][0], deltas[2]["tool_calls"][0]
        assert head["function"] == {"name": "get_weather", "arguments": ""} and len(head["id"]) == 9
        assert args == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
        assert all("content" not in d for d in deltas[1:])  # the raw call never leaks as text
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    two = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]'
    with make_client(tiny_dir, ScriptedEngine(lambda r: [([tok.tool_calls_token_id, 5], two)])) as api:
        assert len(post(api, body, headers={}).json()["choices"][0]["message"]["tool_calls"]) == 2
        one = post(api, {**body, "parallel_tool_calls": False}, headers={}).json()["choices"][0]
        assert [c["function"]["name"] for c in one["message"]["tool_calls"]] == ["a"]
    cut = [([tok.tool_calls_token_id, 5], call[:30])]  # a free ("auto") call that did not close
    with make_client(tiny_dir, ScriptedEngine(lambda r: cut)) as api:
        choice = post(api, body, headers={}).json()["choices"][0]
        assert choice["message"]["content"] == "" and "tool_calls" not in choice["message"]
        streamed = events(post(api, {**body, "stream": True}, headers={}))[:-1]
        assert "get_weather" not in json.dumps(streamed)  # the raw JSON never leaks as content


class HalfDone(ScriptedEngine):
    """One token for every request, and then nothing: a request that never finishes."""

    def submit(self, requests: list[GenerateRequest]) -> Outputs:
        outputs = Outputs([r.request_id for r in requests], self.aborted.extend)
        for r in requests:
            outputs.put([RequestOutput(r.request_id, [1], "a", [], False, None, None, 3, 1)])
        return outputs


def test_overload_timeout_and_a_lost_engine_are_openai_errors(tiny_dir):
    def overloaded(r):
        return Refusal(r.request_id, "at capacity", code="overloaded")

    with make_client(tiny_dir, ScriptedEngine(overloaded), retry_after_s=7) as api:
        r = post(api, GOOD, headers={})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["error"]["type"] == "rate_limit_error"
    half = HalfDone(None)
    with make_client(tiny_dir, half, request_timeout_s=0.3) as api:
        r = post(api, GOOD, headers={})
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert len(half.aborted) == 1  # and the engine was told to stop it
        ev = events(post(api, {**GOOD, "stream": True}, headers={}))
        assert ev[-2]["error"]["code"] == "request_timeout" and ev[-1] == "[DONE]"
    gone = ScriptedEngine(lambda r: EngineUnavailable("lost the router"))
    with make_client(tiny_dir, gone) as api:
        r = post(api, GOOD, headers={})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_outputs_abort_what_is_left_when_the_reader_leaves():
    aborted: list[str] = []

    async def run() -> None:
        outputs = Outputs(["a", "b"], aborted.extend)
        outputs.put([RequestOutput("a", [1], "x", [], True, "stop", None, 1, 1)])
        assert (await outputs.next()).request_id == "a"
        outputs.close()

    asyncio.run(run())
    assert aborted == ["b"]


def test_sampling_params_cross_as_typed_requests(tiny_dir, engine):
    """What the API hands the engine host is one GenerateRequest per choice, seed + i."""
    seen: list[GenerateRequest] = []

    class Recorder(LocalEngineClient):
        def submit(self, requests):
            seen.extend(requests)
            return super().submit(requests)

    with make_client(tiny_dir, Recorder(engine)) as api:
        assert post(api, {**GOOD, "n": 2, "seed": 5, "top_k": 3}, headers={}).status_code == 200
    assert [type(r.params) for r in seen] == [SamplingParams] * 2
    assert [r.params.seed for r in seen] == [5, 6] and seen[0].params.top_k == 3


def test_docs_load_nothing_from_other_hosts(api):
    """/docs and /redoc work on an air-gapped cluster: every script and stylesheet they load is
    served by raymix itself."""
    import re

    for page in ("/docs", "/redoc"):
        html = api.get(page).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"url: ?'([^']+)'", html)
        assert any(a.endswith(".js") for a in assets), html
        for url in assets:
            assert url.startswith("/"), f"{page} loads {url} from another host"
            r = api.get(url)
            assert r.status_code == 200 and len(r.content) > 0, url


def test_web_page_loads_only_its_own_files(api):
    """`/` is the web page; every stylesheet, script and ES module it loads (followed through the
    modules' imports) is served by raymix itself from the package, and the vendored chart
    library's licence ships beside it."""
    import re

    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    todo = re.findall(r"""(?:src|href)=["'](/[^"']+)["']""", page.text)
    assert "/ui/app.js" in todo and not re.search(r"""(?:src|href)=["']https?:""", page.text)
    seen = set()
    while todo:
        url = todo.pop()
        if url in seen:
            continue
        seen.add(url)
        r = api.get(url)
        assert r.status_code == 200 and r.content, url
        if url.endswith(".js"):
            for target in re.findall(r"""^\s*import\b[^'"]*["']([^"']+)["']""", r.text, re.M):
                assert target.startswith("./"), f"{url} imports {target}"
                todo.append(url.rsplit("/", 1)[0] + "/" + target[2:])
    assert {"/ui/chat.js", "/ui/experts.js", "/ui/vendor/uPlot.esm.js", "/ui/style.css"} <= seen
    assert "MIT License" in api.get("/ui/vendor/uPlot.LICENSE").text
    missing = api.get("/ui/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_expert_status_and_rebalance_in_process(api):
    """The expert view's endpoints, documented in the OpenAPI schema: /experts (in-process: the
    model's shape, no shards, nothing counted); a rebalance says why it cannot plan here. Both
    need the key when keys are set."""
    assert api.get("/experts").status_code == 401
    status = api.get("/experts", headers=AUTH)
    assert status.status_code == 200
    body = status.json()
    assert body["shards"] == [] and body["num_layers"] > 0 and body["num_experts"] == 8
    assert len(body["recent_expert_tokens"]) == body["num_layers"]
    assert all(len(row) == body["num_experts"] for row in body["expert_tokens"])
    refused = api.post("/experts/rebalance")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    plan = api.post("/experts/rebalance", headers=AUTH)
    assert (
        plan.status_code == 200 and plan.json()["changed"] is False and "in-process" in plan.json()["reason"]
    )
    schema = api.get("/openapi.json").json()
    assert {"/experts", "/experts/rebalance"} <= set(schema["paths"])
    assert "/" not in schema["paths"]  # the page is not part of the API
    shard = schema["components"]["schemas"]["ShardStatus"]["properties"]
    assert {"experts", "replicas", "healthy", "dispatch_ms"} <= set(shard)


def test_request_ids_access_log_and_model_revision(api, tiny_dir, engine, caplog, tmp_path):
    import logging
    import shutil

    from moe.checkpoint.reader import checkpoint_revision

    secret = "my secret prompt text"
    body = {"messages": [{"role": "user", "content": secret}], "max_tokens": 3, "temperature": 0}
    with caplog.at_level(logging.INFO, logger="raymix.access"):
        r = post(api, body, headers={**AUTH, "X-Request-Id": "trace-42"})
        s = post(api, {**body, "stream": True})
        bad = post(api, {**body, "temperature": 9})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "chatcmpl-trace-42"
    generated = s.headers["x-request-id"]
    assert len(generated) == 32 and events(s)[0]["id"] == f"chatcmpl-{generated}"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "raymix.access"]
    assert [(x["request_id"], x["status"]) for x in lines] == [
        ("trace-42", 200), (generated, 200), (bad.headers["x-request-id"], 400)
    ]  # fmt: skip
    first = lines[0]
    assert first["model"] == "tiny" and first["path"] == "/v1/chat/completions"
    assert first["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] and first["completion_tokens"] == 3
    assert first["finish_reason"] == "length" and 0 < first["ttft_s"] <= first["latency_s"]
    assert lines[1]["completion_tokens"] == 3  # a stream's line is written when the stream ends
    assert secret not in caplog.text  # prompts stay out of the log unless the operator opts in
    with (
        make_client(tiny_dir, LocalEngineClient(engine), access_log_prompts=True) as opted,
        caplog.at_level(logging.INFO, logger="raymix.access"),
    ):
        post(opted, body, headers={})
    assert json.loads(caplog.records[-1].getMessage())["prompt"] == body["messages"]

    revision = checkpoint_revision(tiny_dir)
    assert len(revision) == 16
    assert api.get("/version", headers=AUTH).json()["model_revision"] == revision
    assert api.get("/v1/models", headers=AUTH).json()["data"][0]["revision"] == revision
    assert f'raymix:model_info{{model_name="tiny",revision="{revision}"}} 1.0' in api.get("/metrics").text
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert checkpoint_revision(copy) == revision  # a content hash: the same files, the same name
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert checkpoint_revision(copy) != revision


def test_gpu_memory_is_exported_per_deployment():
    """On GPUs the router's stats carry each deployment's GPU memory (none on the CPU)."""
    from moe.engine.llm_engine import gpu_memory

    assert gpu_memory(torch.device("cpu")) is None
    stats = RouterStats(EngineStats(), True, gpu_memory={"router": {"used": 5 * 2**30, "total": 80 * 2**30}})
    text = ServingMetrics().render([stats])[0].decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("raymix:gpu"))
    assert float(values['raymix:gpu_memory_used_bytes{deployment="router"}']) == 5 * 2**30
    assert float(values['raymix:gpu_memory_total_bytes{deployment="router"}']) == 80 * 2**30
    assert "gpu_memory" not in ServingMetrics().render([RouterStats(EngineStats(), True)])[0].decode()


def test_per_expert_series_are_bounded(api):
    """48 layers x 128 experts (Qwen3-30B-A3B) is 6144 series a router: past 4096, `auto`
    exports one series per shard (every layer's and expert's assignments added up)."""
    from moe.expert_parallel.load import ExpertLoadSnapshot

    def load(layers: int, experts: int) -> ExpertLoadSnapshot:
        counts = {layer: [layer + e for e in range(experts)] for layer in range(layers)}
        primary = [e * 4 // experts for e in range(experts)]  # 4 shards
        return ExpertLoadSnapshot(
            counts, primary, (0.1,), [[0, 0]] * 4, [0.0] * 4, 1.0, [1] * experts, {}, []
        )

    stats = [RouterStats(EngineStats(), True)]
    for mode, layers, experts, per_expert in [
        ("auto", 4, 8, True),
        ("auto", 48, 128, False),
        ("expert", 48, 128, True),
        ("shard", 4, 8, False),
    ]:
        snapshot = load(layers, experts)
        text = ServingMetrics(expert_metrics=mode).render(stats, [snapshot])[0].decode()
        lines = [x for x in text.splitlines() if not x.startswith("#")]
        expert_lines = [x for x in lines if x.startswith("raymix:expert_tokens_total")]
        shard_lines = [x for x in lines if x.startswith("raymix:shard_expert_tokens_total")]
        assert len(expert_lines) == (layers * experts if per_expert else 0)
        assert len(shard_lines) == (0 if per_expert else 4)
        total = sum(sum(c) for c in snapshot.expert_tokens.values())
        assert sum(float(x.rsplit(" ", 1)[1]) for x in expert_lines + shard_lines) == total


def test_json_nested_deeper_than_the_limit_is_named_and_shallower_is_read(api):
    deep = post(api, b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")  # within the body limit
    assert deep.status_code == 400 and "nested deeper than 128 levels" in deep.json()["error"]["message"]
    inside_a_string = {**GOOD, "user": "[" * 1000}  # brackets in strings do not nest
    assert post(api, inside_a_string).status_code == 200
    schema: dict = {"type": "integer"}
    for _ in range(20):  # a 20-level JSON schema (~45 levels of JSON) is served
        schema = {"type": "object", "properties": {"x": schema}}
    body = {
        **GOOD,
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
    }
    assert post(api, {**body, "max_tokens": 200}).status_code == 200


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-123"}},
    ],
)
def test_parts_a_text_model_cannot_read_are_refused_by_name(api, part):
    content = [{"type": "text", "text": "What is in this?"}, part]
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 3}),
        ("/tokenize", {"messages": [{"role": "user", "content": content}]}),
        ("/production/predict", {"messages": [{"role": "user", "content": content}]}),
    ):
        r = post(api, body, path=path)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "messages.0.content.1" and part["type"] in r.text
    text_only = [{"type": "text", "text": "What is "}, {"type": "text", "text": "in this?"}]
    joined = post(api, {"messages": [{"role": "user", "content": "What is in this?"}]}, path="/tokenize")
    parts = post(api, {"messages": [{"role": "user", "content": text_only}]}, path="/tokenize")
    assert parts.json()["tokens"] == joined.json()["tokens"]  # text parts are still joined


def test_completions_name_the_prompt_when_it_is_too_long(api):
    r = post(api, {"prompt": "hello " * 300, "max_tokens": 10}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = post(api, {"prompt": "hello", "max_tokens": 1000}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_prompts_times_n_are_bounded_before_any_work(api):
    """A prompt array multiplied by n: at most --max-num-seqs choices (64 here), refused before
    tokenizing (a 0.5 MB body of short prompts once made 1.6 M choices on the event loop)."""
    r = post(api, {"prompt": ["a"] * 10_000, "n": 16, "max_tokens": 1}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "160000 choices" in r.json()["error"]["message"]
    r = post(api, {"prompt": ["a", "b", "c", "d", "e"], "n": 16, "max_tokens": 1}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    ok = post(api, {"prompt": ["a", "b", "c", "d"], "n": 16, "max_tokens": 1}, path="/v1/completions")
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 64


@pytest.mark.parametrize("ids", [[-1], [32768], [5, 1 << 40]])
def test_prompt_token_ids_outside_the_vocabulary_are_refused(api, ids):
    """Also where nothing is generated (max_tokens 0 with echo: the echo was a 500 before)."""
    for extra in ({"max_tokens": 0, "echo": True}, {"max_tokens": 2}):
        r = post(api, {"prompt": ids, **extra}, path="/v1/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_model_retrieve_and_max_model_len(api):
    import openai

    listed = api.get("/v1/models", headers=AUTH).json()["data"][0]
    assert listed["max_model_len"] == 256
    r = api.get("/v1/models/tiny", headers=AUTH)
    assert r.status_code == 200 and r.json() == {**listed, "created": r.json()["created"]}
    assert r.json()["object"] == "model" and r.json()["owned_by"] == "raymix"
    missing = api.get("/v1/models/gpt-17", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert api.get("/v1/models/tiny").status_code == 401  # behind the key like the list
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=api, max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_fuzzed_requests_behind_a_route_prefix_need_the_key_and_never_get_a_5xx(tiny_dir, engine):
    """Schemathesis' generated requests (valid and invalid, from the app's own OpenAPI document)
    to the app mounted under a prefix, as a Serve route_prefix mounts it: without the key every
    route but the public ones answers 401; with it, nothing answers 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from api.app import PUBLIC

    s = RaymixSettings(
        model=str(tiny_dir), served_model_name=["tiny"], api_key=[KEY], request_timeout_s=2, max_num_seqs=8
    )  # a generated request runs at most 2 s (408 then): the test is bounded whatever is drawn
    ctx = ServingContext(s, LocalEngineClient(engine), load_tokenizer(tiny_dir), {}, ServingMetrics())
    inner = build_api(ctx)
    schema = schemathesis.openapi.from_dict(inner.openapi())
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 10
    with TestClient(Starlette(routes=[Mount("/raymix", app=inner)]), raise_server_exceptions=False) as client:
        for op in operations:

            @given(case=op.as_strategy())
            @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case) -> None:
                kw = case.as_transport_kwargs(base_url="http://testserver/raymix")
                kw.pop("cookies", None)
                kw["headers"] = {k: v for k, v in kw["headers"].items() if k.lower() != "authorization"}
                bare = client.request(**kw)
                if case.formatted_path not in PUBLIC:
                    assert bare.status_code == 401, f"{case.method} {case.formatted_path}: {bare.status_code}"
                kw["headers"] = {**kw["headers"], **AUTH}
                keyed = client.request(**kw)
                assert keyed.status_code < 500, f"{case.method} {case.formatted_path}: {keyed.text[:300]}"

            fuzz()
