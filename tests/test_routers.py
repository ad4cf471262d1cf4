"""Several routers sharing the expert shards (--routers 2 --expert-shards 2 or 4), end to end: a
real local Ray cluster, real HTTP, the openai client. One Ray cluster for the module.

Greedy outputs stay transformers' under concurrent load whichever router serves them; a shared
system prompt finds its prefix cached on the router that saw it; a resize and a rebalance under
load move every router to the new placement between steps; a router killed under load fails no
stream (its requests resume on the other router) and its replacement rejoins the shards."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import openai
import pytest

from tests.cluster_harness import (
    QUESTIONS,
    Raymix,
    clients_asking,
    free_port,
    greedy_answer,
    greedy_answers,
    ray_cluster,
    reference_answers,
    stream_all,
    stream_chat_ending,
    wait_until,
)

SETTINGS = dict(routers=2, max_model_len=512, kv_cache_memory_mb=32, max_ingress_replicas=2)
SKEWED = ["the the the the the the the the", "the the the the the the the the!"] * 4  # a few hot experts
SYSTEM = (
    "You are the weather desk of a small mountain town. Answer in one short paragraph, name the "
    "wind if you know it, and never forecast more than three days ahead. Be kind to tourists."
)


@pytest.fixture(scope="module")
def raymix():
    with ray_cluster(num_cpus=2):
        yield Raymix(free_port())


@pytest.fixture(scope="module")
def reference():
    return reference_answers(QUESTIONS, 16)


def handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="raymix")


def router_stats() -> list:
    return [handle(name).stats.remote().result() for name in ("Router", "Router1")]


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_two_routers_answer_as_transformers_under_load(raymix, reference):
    """8 concurrent chats spread over both routers, answers token-identical to transformers;
    completions and streams too; each shard serves both routers."""
    url = raymix.deploy(expert_shards=2, **SETTINGS)
    client = client_for(url)
    before = [s.steps for s in router_stats()]
    assert greedy_answers(client, QUESTIONS, 16) == reference
    assert all(s.steps > b for s, b in zip(router_stats(), before, strict=True))  # both routers worked
    infos = [handle(f"ExpertShard{k}").info.remote().result() for k in range(2)]
    assert [i.routers for i in infos] == [2, 2]

    streamed = []
    with cf.ThreadPoolExecutor(4) as pool:
        for chunks in pool.map(
            lambda q: list(
                client.chat.completions.create(
                    model="raymix-tiny-mixtral",
                    messages=[{"role": "user", "content": q}],
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                )
            ),
            QUESTIONS[:4],
        ):
            streamed.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert streamed == reference[:4]
    text = client.completions.create(model="raymix-tiny-mixtral", prompt="Hello", max_tokens=8, temperature=0)
    same = client.completions.create(model="raymix-tiny-mixtral", prompt="Hello", max_tokens=8, temperature=0)
    assert text.choices[0].text == same.choices[0].text and text.usage.completion_tokens == 8


def test_a_shared_system_prompt_finds_its_prefix_on_its_router(raymix):
    """Requests that share a system prompt all go to the router that has it cached: its prefix
    hits grow by the system prompt's blocks each time, the other router sees none of them
    (without affinity, ties go in turn and half of them would land there)."""
    url = raymix.deploy(expert_shards=2, **SETTINGS)
    client = client_for(url)
    before = router_stats()
    for q in ["Will it rain?", "Is the pass open?", "What about the foehn?", "Sun tomorrow?"]:
        client.chat.completions.create(
            model="raymix-tiny-mixtral",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            max_tokens=4,
            temperature=0,
        )
    after = router_stats()
    queries = [
        a.engine.prefix_cache_queries - b.engine.prefix_cache_queries
        for a, b in zip(after, before, strict=True)
    ]
    hits = [
        a.engine.prefix_cache_hits - b.engine.prefix_cache_hits for a, b in zip(after, before, strict=True)
    ]
    owner = 0 if queries[0] else 1
    assert queries[1 - owner] == 0, queries  # every one of them went to one router
    assert hits[owner] >= 3 * 32, hits  # the three after the first found the system prompt's blocks


def test_resizing_under_load_with_two_routers_loses_nothing(raymix, reference):
    """2 -> 4 -> 2 shards (`raymix scale`) while four clients keep asking: both routers connect
    the new shards and switch, every request is answered as transformers answers it."""
    from cluster.config import RaymixSettings
    from launch.scale import scale

    url = raymix.deploy(expert_shards=2, **SETTINGS)
    client = client_for(url)
    settings = RaymixSettings(**{**SETTINGS, "expert_shards": 2, "port": raymix.port})
    with clients_asking(client) as (done, errors):
        time.sleep(2)
        grown = scale(settings, 4)
        assert [s.expert_shards for s in router_stats()] == [4, 4]
        time.sleep(3)
        shrunk = scale(settings, 2)
        assert [s.expert_shards for s in router_stats()] == [2, 2]
        time.sleep(2)
    print(f"resizing under load with 2 routers: {len(done)} requests answered")
    assert not errors, errors[:3]
    assert grown.expert_groups == [[0, 1], [2, 3], [4, 5], [6, 7]] and len(shrunk.expert_groups) == 2
    assert all(answer == reference[q] for q, answer in done)
    steps = [s.steps for s in router_stats()]
    assert greedy_answers(client, QUESTIONS, 16) == reference  # both routers, 2 shards again
    assert all(s.steps > b for s, b in zip(router_stats(), steps, strict=True))


def test_rebalance_under_load_moves_every_router_and_changes_no_output(raymix):
    """A skewed load, a rebalance in the middle of it: router 0 plans from both routers' load,
    both switch placement between their steps, every greedy output stays what it was; router 1
    leaves planning to router 0."""
    url = raymix.deploy(expert_shards=4, num_redundant_experts=4, **SETTINGS)
    client = client_for(url)
    prompts = SKEWED

    before = greedy_answers(client, prompts, 40, ignore_eos=True)
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        running = [pool.submit(greedy_answer, client, q, 40, ignore_eos=True) for q in prompts]
        wait_until(lambda: sum(s.engine.num_requests_running for s in router_stats()) > 0)
        plan = handle("Router").rebalance.remote().result()
        during = [f.result() for f in running]
    assert plan.changed and plan.replicas, plan
    assert during == before
    assert greedy_answers(client, prompts, 40, ignore_eos=True) == before
    holders = [handle(name).expert_load.remote().result().expert_holders for name in ("Router", "Router1")]
    assert holders[0] == holders[1] and max(holders[0]) > 1  # both route by the replicated placement
    refused = handle("Router1").rebalance.remote().result()
    assert not refused.changed and "router 0" in refused.reason


def test_a_shard_killed_under_load_is_recovered_by_both_routers(raymix):
    """SIGKILL a shard (holding replicas since the rebalance) while 8 streams run on the two
    routers: both reconnect to its replacement, which gets back what it held, and every stream
    ends exactly as an undisturbed run does."""
    url = raymix.deploy(expert_shards=4, num_redundant_experts=4, **SETTINGS)
    questions = [f"Question number {i}: tell me about expert {i % 8}." for i in range(8)]
    undisturbed = stream_all(url, questions)
    shard = handle("ExpertShard0")
    old = shard.info.remote().result()
    before = router_stats()

    def kill() -> None:  # as soon as both routers are generating: both then meet the dead shard
        wait_until(lambda: min(s.engine.num_requests_running for s in router_stats()) > 0)
        os.kill(old.pid, signal.SIGKILL)

    assert stream_all(url, questions, during=kill) == undisturbed
    after = router_stats()
    assert all(a.shard_recoveries > b.shard_recoveries for a, b in zip(after, before, strict=True))
    new = shard.info.remote().result()
    assert new.pid != old.pid and new.expert_ids == old.expert_ids and new.routers == 2


def test_a_router_killed_under_load_fails_no_stream(raymix):
    """SIGKILL router 1 while 6 streams run on both routers: every stream goes on (those on
    router 1 resume on router 0 from the tokens they had sent) and ends as an undisturbed run
    does, no token repeated or missing; every request sent after the kill is answered (by router
    0 while router 1 is down); Serve replaces router 1, which takes the replicated placement the
    serving router has (not its start-up split, which would drop replicas router 0 routes to),
    rejoins every shard, and answers as before."""
    url = raymix.deploy(expert_shards=4, num_redundant_experts=4, **SETTINGS)
    client = client_for(url)
    greedy_answers(client, SKEWED, 40, ignore_eos=True)
    handle("Router").rebalance.remote().result()  # replicas (unless an earlier test made them)
    holders = handle("Router").expert_load.remote().result().expert_holders
    assert max(holders) > 1
    expected = greedy_answers(client, QUESTIONS, 16)
    old_pid = handle("Router1").model_info.remote().result().pid
    started = cf.ThreadPoolExecutor(6)

    def stream() -> tuple[str, str]:
        return stream_chat_ending(url, "go on", 200)

    undisturbed = stream()
    assert undisturbed[1] == "length"
    streams = [started.submit(stream) for _ in range(6)]
    wait_until(lambda: min(s.engine.num_requests_running for s in router_stats()) > 0)
    os.kill(old_pid, signal.SIGKILL)
    killed = time.monotonic()
    after = greedy_answers(client, QUESTIONS, 8)  # sent after the kill: every one answered
    assert len(after) == len(QUESTIONS) and all(isinstance(a, str) for a in after)
    outcomes = [s.result(timeout=240) for s in streams]
    started.shutdown()
    assert outcomes == [undisturbed] * 6, [o[1] for o in outcomes]  # every stream, as undisturbed
    print(
        f"6 streams through router 1's kill all ended as undisturbed; {len(after)} requests after it answered"
    )

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            info = handle("Router1").model_info.remote().result(timeout_s=5)
            if info.ready and info.pid != old_pid:
                break
        except Exception:
            pass
        time.sleep(1)
    else:
        pytest.fail("router 1 was not replaced")
    print(f"router 1 replaced and ready {time.monotonic() - killed:.1f} s after the kill")
    infos = [handle(f"ExpertShard{k}").info.remote().result() for k in range(4)]
    assert [i.routers for i in infos] == [2] * 4  # the replacement rejoined every shard
    steps = handle("Router1").stats.remote().result().steps
    deadline = time.monotonic() + 30  # the ingress sends to it again once it answers ready
    while handle("Router1").stats.remote().result().steps == steps and time.monotonic() < deadline:
        greedy_answers(client, QUESTIONS[:4], 4)
    assert handle("Router1").stats.remote().result().steps > steps
    assert handle("Router1").expert_load.remote().result().expert_holders == holders  # the replicas kept
    infos = [handle(f"ExpertShard{k}").info.remote().result() for k in range(4)]
    assert sum(len(i.expert_ids) for i in infos) == sum(holders)  # no shard lost one
    for _ in range(2):  # on both routers: the answers they gave before the kill
        assert greedy_answers(client, QUESTIONS, 16) == expected


def test_a_subscriber_that_never_opens_its_stream_is_dropped_with_its_requests():
    """An ingress replica that submitted and died before opening its stream: once a later
    subscriber arrives past UNOPENED_S, its requests are aborted and its sink is gone (the map
    was never pruned). No Ray here: the Router's own methods over a recording engine."""
    import asyncio

    from cluster.messages import GenerateRequest
    from deployments.router import UNOPENED_S, Router
    from moe.sampling import SamplingParams

    class Engine:
        def __init__(self):
            self.added, self.aborted = [], []

        def add(self, rid, prompt, params, sink, *resumed):
            self.added.append(rid)

        def abort(self, rid):
            self.aborted.append(rid)

    cls = Router
    router = cls.__new__(cls)
    router.sinks, router.owned, router.unopened, router.draining = {}, {}, {}, False
    router.engine = Engine()

    async def run():
        await router.submit("gone", [GenerateRequest("r1", [1, 2], SamplingParams())])
        router.unopened["gone"] -= UNOPENED_S + 1  # it has waited longer than that
        await router.submit("alive", [GenerateRequest("r2", [1, 2], SamplingParams())])
        stream = router.stream("alive")
        opened = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        assert router.engine.added == ["r1", "r2"] and router.engine.aborted == ["r1"]
        assert set(router.sinks) == {"alive"} and "gone" not in router.owned and router.unopened == {}
        opened.cancel()

    asyncio.run(run())


def test_a_hung_follower_fails_the_rebalance_in_bounded_time_and_frees_the_next_one(monkeypatch):
    """A follower router that never answers (hung, or half-dead): the rebalance fails with a
    timeout naming what did not finish, and the placement lock is free for the next change
    (it was held forever). No Ray: the controller over fakes, the timeout shortened."""
    import asyncio
    from types import SimpleNamespace

    from deployments import placement_controller as pc

    monkeypatch.setattr(pc, "CALL_TIMEOUT_S", 0.2)

    class Hung:
        class recent_expert_load:  # a Serve handle's method: .remote()
            @staticmethod
            def remote():
                return asyncio.sleep(3600)

    load = SimpleNamespace(recent_expert_load=lambda: [[1, 0, 0, 0]], reset_window=lambda: None)
    experts = SimpleNamespace(load=load)

    async def run():
        controller = pc.PlacementController(
            pool=[0, 1], primaries=[[0, 1], [2, 3]], num_experts=4, num_redundant_experts=1,
            data_plane=lambda: experts, between_steps=None, followers=[Hung()],
        )  # fmt: skip
        with pytest.raises(TimeoutError, match=r"a router's expert load did not finish within 0\.2 s"):
            await controller.rebalance()
        assert not controller._changing.locked()

    asyncio.run(run())
