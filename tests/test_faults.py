"""An expert shard killed mid-generation fails no request: its replacement is connected and the
interrupted layer is sent again (experts hold no per-request state), so every running stream
completes with exactly the output of an undisturbed run. The one router killed mid-stream fails
no stream either: it waits for the replacement and goes on from the tokens it had sent."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from tests.cluster_harness import Raymix, free_port, ray_cluster, stream_all, stream_chat_ending, wait_until

QUESTIONS = [f"Question number {i}: tell me about expert {i % 8}." for i in range(16)]


@pytest.fixture(scope="module")
def rm():
    with ray_cluster():
        r = Raymix(free_port())
        r.deploy(expert_shards=2, max_model_len=256, kv_cache_memory_mb=32)
        yield r


def test_killed_shard_fails_no_request(rm):
    from ray import serve

    undisturbed = stream_all(rm.url, QUESTIONS)
    shard = serve.get_deployment_handle("ExpertShard0", app_name="raymix")
    pid = shard.info.remote().result().pid
    before = rm.router_stats()

    def kill_midway() -> None:
        deadline = time.monotonic() + 60
        while rm.router_stats().engine.num_requests_running < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # generation under way
        os.kill(pid, signal.SIGKILL)

    disturbed = stream_all(rm.url, QUESTIONS, during=kill_midway)
    after = rm.router_stats()
    assert after.shard_recoveries > before.shard_recoveries  # the kill did land mid-generation
    assert disturbed == undisturbed
    assert shard.info.remote().result().pid != pid  # a new replica holds the experts now
    assert rm.wait_idle().engine.num_used_kv_blocks == 0


def test_service_continues_after_recovery(rm):
    r = httpx.post(f"{rm.url}/v1/completions", json={"prompt": "after", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{rm.url}/health", timeout=60).status_code == 200


def test_router_killed_the_stream_waits_for_its_replacement_and_ends_whole(rm):
    """The one router SIGKILLed mid-stream: the stream waits for Serve's replacement and goes
    on there from the tokens it had sent, ending as an undisturbed run does (no error, no token
    repeated or missing); meanwhile /health says 503; then service resumes with no operator."""
    from ray import serve

    router_pid = serve.get_deployment_handle("Router", app_name="raymix").model_info.remote().result().pid
    undisturbed = stream_chat_ending(rm.url, "long", 200)
    assert undisturbed[1] == "length"
    saw_unhealthy = False
    chunks: list[dict] = []  # the stream's, as they come: the kill lands mid-stream
    with cf.ThreadPoolExecutor(1) as pool:
        f = pool.submit(stream_chat_ending, rm.url, "long", 200, chunks)
        while len(chunks) < 5:
            time.sleep(0.05)
        os.kill(router_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not saw_unhealthy and not f.done() and time.monotonic() < deadline:
            saw_unhealthy = httpx.get(f"{rm.url}/health", timeout=10).status_code == 503
            time.sleep(0.2)
        assert f.result() == undisturbed
    assert saw_unhealthy
    r = httpx.post(f"{rm.url}/v1/completions", json={"prompt": "back", "max_tokens": 4}, timeout=120)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{rm.url}/health", timeout=10).status_code == 200


def test_a_dead_shard_with_every_expert_on_two_shards_costs_no_wait(rm):
    """--expert-replicas 2 over 3 shards: SIGKILL a shard under 16 streams. Every stream ends as
    the undisturbed run; the router took the dead shard's part to its experts' other holders
    (`shard_failovers`) and no step waited for the replacement (`shard_waits` unchanged: the
    router's own records, not wall time); the replacement is connected meanwhile."""
    from ray import serve

    rm.deploy(expert_shards=3, expert_replicas=2, max_model_len=256, kv_cache_memory_mb=32)
    shard = serve.get_deployment_handle("ExpertShard1", app_name="raymix")
    assert wait_until(
        lambda: len(shard.info.remote().result().expert_ids) > 3, timeout=120
    )  # replicas placed
    undisturbed = stream_all(rm.url, QUESTIONS)
    pid = shard.info.remote().result().pid
    before = rm.router_stats()

    def kill_midway() -> None:
        wait_until(lambda: rm.router_stats().engine.num_requests_running >= 8)
        time.sleep(0.3)  # generation under way
        os.kill(pid, signal.SIGKILL)

    assert stream_all(rm.url, QUESTIONS, during=kill_midway) == undisturbed
    after = rm.router_stats()
    assert after.shard_failovers > before.shard_failovers and after.shard_waits == before.shard_waits
    assert wait_until(lambda: rm.router_stats().shard_recoveries > before.shard_recoveries, timeout=120)
    assert shard.info.remote().result().pid != pid


def test_graceful_drain_finishes_in_flight_requests(rm):
    """Deleting the app (what SIGTERM, a redeploy or a scale-down do) lets in-flight requests
    finish within drain_timeout_s, and accepts nothing new. Runs last: it takes the app down."""
    from ray import serve

    body = {"prompt": "drain", "max_tokens": 60, "ignore_eos": True}
    with cf.ThreadPoolExecutor(1) as pool:
        f = pool.submit(lambda: httpx.post(f"{rm.url}/v1/completions", json=body, timeout=120))
        deadline = time.monotonic() + 30
        while rm.router_stats().engine.num_requests_running == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        serve.delete("raymix")  # graceful: blocks until the replicas have drained and stopped
        r = f.result()
    assert r.status_code == 200, r.text
    assert (
        r.json()["usage"]["completion_tokens"] == 60 and r.json()["choices"][0]["finish_reason"] == "length"
    )
    try:
        after = httpx.post(f"{rm.url}/v1/completions", json=body, timeout=10).status_code
    except httpx.HTTPError:
        after = "refused"
    assert after in (404, 503, "refused")
