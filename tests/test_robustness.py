"""Hostile and heavy traffic against a live cluster: nothing else is disturbed.

Anchored on TensorRT-LLM's negative suite for its OpenAI server (invalid requests in a row,
concurrently, mixed with valid ones; /health 200 throughout) and vLLM's cancellation tests
(requests cut mid-stream: running, waiting and KV usage back to 0, then a fresh request
succeeds). Bounded in count and time; everything on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest

from moe.engine.llm_engine import EngineConfig, LLMEngine
from moe.expert_parallel.backend import InProcessExperts
from tests.cluster_harness import Raymix, free_port, ray_cluster, same_id_requests
from tests.local_server import local_server

SETTINGS = dict(
    expert_shards=2,
    max_model_len=512,
    kv_cache_memory_mb=64,
    max_num_seqs=4,
    max_queued_requests=4,
)
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD = [
    b"{not json",
    b"[]",
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": [{"role": "user"}], "temperature": -3}).encode(),
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
    json.dumps({**GOOD, "max_tokens": -1}).encode(),
    json.dumps({**GOOD, "n": 1000}).encode(),
    json.dumps({**GOOD, "logit_bias": {"abc": 1}}).encode(),
    json.dumps({**GOOD, "stop": ["x"] * 100}).encode(),
    json.dumps({**GOOD, "model": "nope"}).encode(),
    json.dumps({**GOOD, "max_tokens": 10**6}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "x"}] * 5000}).encode(),
]


@pytest.fixture(scope="module")
def rm():
    with ray_cluster():
        rm = Raymix(free_port())
        rm.deploy(**SETTINGS)
        yield rm


def post(url: str, body: bytes, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


class HealthWatch:
    """Polls /health in the background; every answer must be 200."""

    def __init__(self, url: str):
        self.url, self.codes, self.stop = url, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.codes.append(httpx.get(f"{self.url}/health", timeout=10).status_code)
            except httpx.HTTPError as e:
                self.codes.append(repr(e))
            time.sleep(0.1)

    def close(self) -> list:
        self.stop.set()
        self.thread.join()
        return self.codes


def check_error(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text and "/work/" not in r.text and ".py" not in r.text


def test_negative_suite(rm):
    health = HealthWatch(rm.url)
    for k in range(100):  # 100 invalid in a row, then a valid one
        check_error(post(rm.url, BAD[k % len(BAD)]))
    assert post(rm.url, json.dumps(GOOD).encode()).status_code == 200
    with cf.ThreadPoolExecutor(16) as pool:  # 50 invalid at once
        for r in pool.map(lambda k: post(rm.url, BAD[k % len(BAD)]), range(50)):
            check_error(r)
    with cf.ThreadPoolExecutor(8) as pool:  # a 75/25 mix of valid and invalid
        bodies = [json.dumps(GOOD).encode() if k % 4 else BAD[k % len(BAD)] for k in range(40)]
        for body, r in zip(bodies, pool.map(lambda b: post(rm.url, b), bodies), strict=True):
            if body == json.dumps(GOOD).encode():
                assert r.status_code in (200, 429), r.text  # 429 only if the queue is full
            else:
                check_error(r)
    assert set(health.close()) == {200}
    stats = rm.wait_idle()
    assert stats.engine.num_used_kv_blocks == 0


def test_overload_gets_429_with_retry_after_then_normal_service(rm):
    body = json.dumps({**GOOD, "max_tokens": 60, "ignore_eos": True}).encode()
    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: post(rm.url, body), range(16)))
    refused = [r for r in codes if r.status_code == 429]
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["code"] == "overloaded"
    assert all(r.status_code in (200, 429) for r in codes)
    assert sum(r.status_code == 200 for r in codes) >= SETTINGS["max_num_seqs"]
    rm.wait_idle()
    assert post(rm.url, json.dumps(GOOD).encode()).status_code == 200


class PacedExperts(InProcessExperts):
    """The experts of every layer take at least `seconds`: a model whose speed does not depend
    on the machine's, so a request of N tokens provably runs past a timeout shorter than
    N x layers x seconds."""

    def __init__(self, inner: InProcessExperts, seconds: float):
        super().__init__(inner.shards, len(inner.placement.count))
        self.seconds = seconds

    def submit(self, layer, x, expert_ids, weights):
        time.sleep(self.seconds)
        return super().submit(layer, x, expert_ids, weights)


def paced_engine(tiny_dir) -> LLMEngine:
    """The engine with experts that take at least 20 ms a layer: 400 tokens outlast any timeout here."""
    eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=512))
    eng.experts = eng.runner.experts = PacedExperts(eng.experts, 0.02)
    return eng


def test_request_timeout_is_408_and_frees_the_request(tiny_dir):
    """A request still running at request_timeout_s gets 408 (an error event on a stream), and
    the engine drops it: nothing running, every KV block back. The engine here needs at least
    4 layers x 20 ms per token, so 400 tokens take 32 s or more against a 1 s timeout on any
    machine (the real engine and HTTP server, no Ray: the API's timeout is the same code there)."""

    def build():
        built.append(eng := paced_engine(tiny_dir))
        return eng

    built: list[LLMEngine] = []
    long = {**GOOD, "max_tokens": 400, "ignore_eos": True}
    with local_server(tiny_dir, build_engine=build, request_timeout_s=1.0) as url:
        r = post(url, json.dumps(long).encode())
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json={**long, "stream": True}, timeout=60
        ) as s:
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert len(events) > 2  # some tokens were streamed before the timeout
        (eng,) = built
        deadline = time.monotonic() + 10
        while eng.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = eng.stats()
        assert stats.num_requests_running == 0 and stats.num_used_kv_blocks == 0


def test_the_deadline_counts_the_wait_for_the_first_output(tiny_dir):
    """One deadline from the request's start: a request whose first output never comes (the
    engine held in its first step) gets its 408 while the engine is still held, not after."""
    held = threading.Event()

    def build():
        eng = LLMEngine.from_pretrained(tiny_dir, EngineConfig(max_model_len=512))
        step = eng.step

        def first_step_held():
            held.wait(120)
            return step()

        eng.step = first_step_held  # type: ignore[method-assign]
        return eng

    try:
        with local_server(tiny_dir, build_engine=build, request_timeout_s=1.0) as url:
            r = post(url, json.dumps(GOOD).encode())
            still_held = not held.is_set()
            held.set()
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert still_held  # it came at the deadline, not when the engine moved again
    finally:
        held.set()


def test_cancelled_streams_release_everything(rm):
    """vLLM's test_request_cancellation and test_abort_metrics_reset, scaled to this machine."""
    body = {**GOOD, "max_tokens": 300, "ignore_eos": True, "stream": True}

    def cut() -> None:
        try:
            with httpx.stream("POST", f"{rm.url}/v1/chat/completions", json=body, timeout=0.5) as s:
                for _ in s.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # the client gives up after 0.5 s

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: cut(), range(8)))
    assert post(rm.url, json.dumps(GOOD).encode(), timeout=60).status_code == 200
    stats = rm.wait_idle()
    assert (
        stats.engine.num_requests_running,
        stats.engine.num_requests_waiting,
        stats.engine.num_used_kv_blocks,
    ) == (
        0,
        0,
        0,
    )


def test_cors_is_off_unless_configured(rm):
    r = httpx.post(
        f"{rm.url}/v1/chat/completions", json=GOOD, headers={"Origin": "https://anywhere.example"}, timeout=60
    )
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_non_streaming_client_that_gives_up_is_aborted(rm):
    body = {**GOOD, "max_tokens": 300, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{rm.url}/v1/chat/completions", json=body, timeout=1.0)  # the client leaves after 1 s
    stats = rm.wait_idle(timeout=20)
    assert (stats.engine.num_requests_running, stats.engine.num_used_kv_blocks) == (0, 0)


@pytest.mark.parametrize("count,stream,n", [(2, False, 1), (4, True, 1), (4, False, 2), (2, True, 3)])
def test_requests_sharing_an_x_request_id_are_all_answered(tiny_dir, count, stream, n):
    """A gateway's trace id on several calls at once: every request is answered in full, and
    the id still comes back (here: the API over the in-process engine; tests/test_cluster.py
    does the same through the router)."""
    with local_server(tiny_dir, request_timeout_s=60) as url:
        results = same_id_requests(url, count, stream, n)
    assert [status for status, _, _ in results] == [200] * count
    assert all(len(texts) == n and all(texts) for _, texts, _ in results)
    assert {rid for _, _, rid in results} == {"trace-shared"}


def test_a_request_the_client_cancels_is_logged_as_499(tiny_dir, caplog):
    """The engine needs at least 4 layers x 20 ms a token: 400 tokens outlast both clients."""
    import logging

    body = {**GOOD, "max_tokens": 400, "ignore_eos": True}
    with (
        local_server(tiny_dir, build_engine=lambda: paced_engine(tiny_dir)) as url,
        caplog.at_level(logging.INFO, logger="raymix.access"),
    ):
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={**body, "stream": True},
            headers={"X-Request-Id": "gone-1"},
        ) as s:
            next(s.iter_lines())  # the first event, then the client leaves
        with pytest.raises(httpx.TimeoutException):
            post(url, json.dumps(body).encode(), timeout=0.5)  # leaves before the answer
        post(url, json.dumps(GOOD).encode())  # a request after them: its line comes last

        def lines() -> list[dict]:
            return [json.loads(r.getMessage()) for r in caplog.records if r.name == "raymix.access"]

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(lines()) < 3:
            time.sleep(0.1)
    by_id = {line["request_id"]: line["status"] for line in lines()}
    assert by_id["gone-1"] == 499
    assert sorted(line["status"] for line in lines()) == [200, 499, 499]
