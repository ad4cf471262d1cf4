"""The cluster end to end: a real local Ray cluster, real HTTP, the official openai client.

One Ray cluster for the module; the app is redeployed with 1, 2 and 4 expert shards."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from moe.checkpoint.tiny import default_model_dir
from tests.cluster_harness import (
    QUESTIONS,
    Raymix,
    clients_asking,
    free_port,
    greedy_answer,
    greedy_answers,
    metric,
    ray_cluster,
    reference_answers,
    same_id_requests,
)

KEY = "sk-raymix-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
SETTINGS = dict(
    api_key=[KEY],
    max_model_len=512,
    kv_cache_memory_mb=64,
    max_request_body_bytes=65536,
    cors_allow_origins=["https://app.example"],
)


RAY_METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def raymix():
    with ray_cluster(_metrics_export_port=RAY_METRICS_PORT):
        yield Raymix(free_port())


@pytest.fixture
def client(raymix):
    url = raymix.deploy(expert_shards=2, **SETTINGS)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the in-process engine and transformers on the same checkpoint."""
    return reference_answers(QUESTIONS, 16)


@pytest.mark.parametrize("shards", [0, 1, 4])
def test_greedy_http_equals_engine_and_transformers(raymix, reference, shards):
    """0 shards: the experts in the router's own process (2 shards: the module's other tests,
    whose answers are checked against these)."""
    url = raymix.deploy(expert_shards=shards, **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)

    assert greedy_answers(client, QUESTIONS, 16) == reference  # 8 concurrent requests share the batch


def test_stream_equals_non_stream_and_usage(client):
    kw = dict(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "Stream me"}],
        max_tokens=12,
        temperature=0,
    )
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.completion_tokens <= 12


def test_max_tokens_gives_length_and_max_completion_tokens(client):
    r = client.chat.completions.create(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "go"}],
        max_completion_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_n2_streaming_and_not(client):
    kw = dict(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "two please"}],
        max_tokens=8,
        n=2,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content  # seeds 5 and 6
    texts = {0: "", 1: ""}
    for c in client.chat.completions.create(stream=True, **kw):
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {0: r.choices[0].message.content, 1: r.choices[1].message.content}
    assert r.usage.completion_tokens == 16  # counted over both choices


def test_stop_strings(client):
    kw = dict(model="raymix-tiny-mixtral", messages=[{"role": "user", "content": "stop test"}], temperature=0)
    full = (
        client.chat.completions.create(max_tokens=20, extra_body={"ignore_eos": True}, **kw)
        .choices[0]
        .message.content
    )
    stop = full[6:9]
    r = client.chat.completions.create(
        max_tokens=20, stop=[stop, "never-appears"], extra_body={"ignore_eos": True}, **kw
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            max_tokens=20, stop=stop, stream=True, extra_body={"ignore_eos": True}, **kw
        )
        if c.choices
    )
    assert streamed == r.choices[0].message.content


def test_logprobs(client):
    r = client.chat.completions.create(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "lp"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the top one
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content.strip()


def test_seed_reproducible(client):
    kw = dict(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "seeded"}],
        max_tokens=10,
        temperature=1.0,
    )
    a = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=42, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=43, **kw).choices[0].message.content
    assert a == b != c


def test_completions_models_tokenize(client, raymix):
    r = client.completions.create(
        model="raymix-tiny-mixtral", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert len(r.choices[0].logprobs.token_logprobs) == r.usage.completion_tokens
    batch = client.completions.create(
        model="raymix-tiny-mixtral", prompt=["Once upon a time", "x"], max_tokens=6, temperature=0
    )
    assert batch.choices[0].text == r.choices[0].text and len(batch.choices) == 2
    assert [m.id for m in client.models.list().data] == ["raymix-tiny-mixtral"]
    tok = httpx.post(
        f"{raymix.url}/tokenize", json={"prompt": "Hello world"}, headers=AUTH, timeout=60
    ).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    back = httpx.post(
        f"{raymix.url}/detokenize", json={"tokens": tok["tokens"]}, headers=AUTH, timeout=60
    ).json()
    assert back["prompt"] == "Hello world"
    assert httpx.get(f"{raymix.url}/version", headers=AUTH, timeout=60).json()["version"]


def post(url: str, body, headers=AUTH, path="/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        url + path, content=content, headers={"Content-Type": "application/json", **headers}, timeout=60
    )


GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        (b"{not json", 400, None, "invalid_json"),
        ({"max_tokens": 3}, 400, "messages", None),
        ({"messages": [], "max_tokens": 3}, 400, "messages", None),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", None),
        ({**GOOD, "temperature": 7}, 400, "temperature", None),
        ({**GOOD, "top_p": 0}, 400, "top_p", None),
        ({**GOOD, "max_tokens": -1}, 400, "max_tokens", None),
        ({**GOOD, "n": 0}, 400, "n", None),
        ({**GOOD, "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
        ({**GOOD, "model": "gpt-17"}, 404, "model", "model_not_found"),
        (b"[" + b"1," * 40000 + b"1]", 413, None, "request_too_large"),
    ],
)
def test_bad_input_gets_openai_errors(client, raymix, body, status, param, code):
    r = post(raymix.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code
    if code == "context_length_exceeded":
        assert "maximum context length is 512 tokens" in err["message"]
    assert post(raymix.url, GOOD).status_code == 200  # and the server keeps serving


def test_request_id_comes_back_once(client, raymix):
    """Behind Serve's proxy the X-Request-Id header comes back once: the client's id, or one
    made for it, which also names the response."""
    r = post(raymix.url, GOOD, headers={**AUTH, "X-Request-Id": "trace-7f3a9c"})
    assert r.headers.get_list("x-request-id") == ["trace-7f3a9c"]
    assert r.json()["id"] == "chatcmpl-trace-7f3a9c"
    r = post(raymix.url, GOOD)
    (made,) = r.headers.get_list("x-request-id")
    assert r.json()["id"] == f"chatcmpl-{made}"


def test_api_keys(client, raymix):
    assert post(raymix.url, GOOD, headers={}).status_code == 401
    r = post(raymix.url, GOOD, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{raymix.url}/v1/models", timeout=60).status_code == 401
    assert httpx.get(f"{raymix.url}/health", timeout=60).status_code == 200  # open
    assert post(raymix.url, GOOD).status_code == 200


def test_disconnect_mid_stream_frees_everything(client, raymix):
    body = {
        "messages": [{"role": "user", "content": "never ending"}],
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", raymix.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = 0
        for line in r.iter_lines():
            lines += line.startswith("data:")
            if lines == 5:
                assert raymix.router_stats().engine.num_requests_running == 1
                break  # the client goes away mid-stream
    stats = raymix.wait_idle()
    assert stats.engine.num_requests_running == 0 and stats.engine.num_used_kv_blocks == 0
    assert metric(raymix.url, "raymix:num_requests_running") == 0
    assert metric(raymix.url, "raymix:kv_cache_usage_perc") == 0
    assert post(raymix.url, GOOD).status_code == 200


def test_cors_only_for_configured_origins(client, raymix):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(
        f"{raymix.url}/v1/chat/completions", headers={"Origin": "https://app.example", **preflight}
    )
    assert ok.headers.get("access-control-allow-origin") == "https://app.example"
    other = httpx.options(
        f"{raymix.url}/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_exactly_what_was_sent(client, raymix):
    from moe.config import ModelConfig

    cfg = ModelConfig.from_pretrained(default_model_dir())
    before = scrape(raymix.url)
    usages = []
    for k, stream in enumerate([False, False, False, True, True]):
        kw = dict(
            model="raymix-tiny-mixtral",
            messages=[{"role": "user", "content": "count " * (k + 1)}],
            max_tokens=6 + k,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        if stream:
            chunks = list(
                client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
            )
            usages.append(chunks[-1].usage)
        else:
            usages.append(client.chat.completions.create(**kw).usage)
    after = scrape(raymix.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    prompt, completion = sum(u.prompt_tokens for u in usages), sum(u.completion_tokens for u in usages)
    assert delta("raymix:prompt_tokens_total") == prompt
    assert delta("raymix:generation_tokens_total") == completion
    assert delta('raymix:request_success_total{finished_reason="length"}') == 5
    assert delta("raymix:e2e_request_latency_seconds_count") == 5
    assert delta("raymix:request_queue_time_seconds_count") == 5
    assert delta("raymix:time_to_first_token_seconds_count") == 2  # the two streams
    assert delta("raymix:inter_token_latency_seconds_count") == completion - 5  # every token after a first
    # every token fed through the model (prompt, then all but the last sampled) goes to top_k experts
    # in every layer
    fed = sum(u.prompt_tokens + u.completion_tokens - 1 for u in usages)
    expert = sum(delta(k) for k in after if k.startswith("raymix:expert_tokens_total{"))
    assert expert == fed * cfg.num_experts_per_tok * cfg.num_hidden_layers
    assert sum(delta(k) for k in after if k.startswith("raymix:dispatch_latency_seconds_count{")) > 0
    assert 0 < after['raymix:shard_balancedness{router="0"}'] <= 1


def test_metrics_also_go_through_rays_metrics_port(client, raymix):
    """What a cluster-wide Prometheus scrapes: each node's Ray metrics agent."""
    import time

    for _ in client.chat.completions.create(
        model="raymix-tiny-mixtral",
        messages=[{"role": "user", "content": "ray metrics"}],
        max_tokens=3,
        stream=True,
    ):
        pass
    wanted = [
        "ray_raymix_generation_tokens",
        "ray_raymix_time_to_first_token_seconds",
        "ray_raymix_e2e_request_latency_seconds",
        "ray_raymix_num_requests_running",
        "ray_raymix_kv_cache_usage_perc",
    ]
    deadline = time.monotonic() + 120
    while True:  # the agent exports on its own period
        text = httpx.get(f"http://127.0.0.1:{RAY_METRICS_PORT}/metrics", timeout=10).text
        missing = [w for w in wanted if w not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not exported through Ray: {missing}"
        time.sleep(2)


def test_dashboard_and_alerts_use_only_exported_metrics(client, raymix):
    import re
    from pathlib import Path

    import yaml

    k8s = Path(__file__).resolve().parent.parent / "k8s"
    client.chat.completions.create(
        model="raymix-tiny-mixtral", messages=[{"role": "user", "content": "m"}], max_tokens=2
    )

    def base(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    scraped = httpx.get(f"{raymix.url}/metrics", timeout=60).text.splitlines()
    families = {base(line.split()[2]) for line in scraped if line.startswith("# TYPE ")}
    dashboard = json.loads((k8s / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = [
        doc
        for doc in yaml.safe_load_all((k8s / "monitoring.yaml").read_text())
        if doc["kind"] == "PrometheusRule"
    ]
    exprs += [r["expr"] for doc in rules for g in doc["spec"]["groups"] for r in g["rules"]]
    used = {base(m) for e in exprs for m in re.findall(r"raymix:[a-z0-9_]+", e)}
    assert len(used) >= 10
    assert used <= families, used - families


def test_hot_expert_replication_while_serving(raymix):
    """A skewed workload (one prompt, many times) loads some shards more than others; a
    rebalance in the middle of it replicates the hot experts onto spare slots, the measured
    max/mean tokens per shard goes down, and every greedy output stays what it was."""
    from ray import serve

    url = raymix.deploy(expert_shards=4, num_redundant_experts=4, **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    router = serve.get_deployment_handle("Router", app_name="raymix")
    prompts = ["the the the the the the the the", "the the the the the the the the!"] * 4

    def ask(q: str) -> str:
        return greedy_answer(client, q, 40, ignore_eos=True)

    before = greedy_answers(client, prompts, 40, ignore_eos=True)
    skewed = router.expert_load.remote().result().balancedness

    with cf.ThreadPoolExecutor(len(prompts) + 1) as pool:  # rebalance while these are running
        running = [pool.submit(ask, q) for q in prompts]
        plan = router.rebalance.remote().result()
        during = [f.result() for f in running]
    assert plan.changed and plan.replicas and plan.after > plan.before, plan
    after = greedy_answers(client, prompts, 40, ignore_eos=True)
    balanced = router.expert_load.remote().result().balancedness
    print(
        f"max/mean tokens per shard: {1 / skewed:.2f} before, {1 / balanced:.2f} after; replicas {plan.replicas}"
    )
    assert during == before and after == before
    assert balanced > skewed
    holders = [
        serve.get_deployment_handle(f"ExpertShard{k}", app_name="raymix").info.remote().result()
        for k in range(4)
    ]
    for e, shards in plan.replicas.items():
        assert all(int(e) in holders[s].expert_ids for s in shards)


def test_resizing_expert_shards_under_load_loses_nothing(raymix, reference):
    """2 -> 4 -> 2 expert shards while four clients keep asking: every request succeeds with the
    greedy answer it always has, and the shards added for the 4 are gone afterwards."""
    import time

    from ray import serve

    from cluster.config import RaymixSettings
    from cluster.messages import extra_shard_app
    from launch.scale import scale

    url = raymix.deploy(expert_shards=2, **SETTINGS)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    settings = RaymixSettings(**{**SETTINGS, "expert_shards": 2, "port": raymix.port})
    with clients_asking(client) as (done, errors):
        time.sleep(2)
        grown = scale(settings, 4)
        n_grown = len(done)
        time.sleep(3)
        router = serve.get_deployment_handle("Router", app_name="raymix")
        assert router.stats.remote().result().expert_shards == 4
        shrunk = scale(settings, 2)
        time.sleep(2)
    print(f"resizing under load: {len(done)} requests, {n_grown} of them by the time 2 -> 4 was done")
    assert not errors, errors[:3]
    assert grown.expert_groups == [[0, 1], [2, 3], [4, 5], [6, 7]] and len(shrunk.expert_groups) == 2
    assert len(done) > n_grown > 0
    assert all(text == reference[q] for q, text in done)
    assert router.stats.remote().result().expert_shards == 2
    assert not {extra_shard_app(2), extra_shard_app(3)} & set(serve.status().applications)


@pytest.mark.parametrize("count,stream,n", [(2, False, 1), (4, True, 1), (4, False, 2)])
def test_requests_sharing_an_x_request_id_are_all_answered(client, raymix, count, stream, n):
    """Through the router, where they hung: 2 and 4 requests at once with one X-Request-Id,
    streamed and not, n > 1; every one answered in full, the id in every answer's header."""
    results = same_id_requests(raymix.url, count, stream, n, headers=AUTH)
    assert [status for status, _, _ in results] == [200] * count
    assert all(len(texts) == n and all(texts) for _, texts, _ in results)
    assert {rid for _, _, rid in results} == {"trace-shared"}
