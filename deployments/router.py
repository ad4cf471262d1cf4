"""Router: the Ray Serve deployment holding the dense part of the model and running the engine.

It loads everything but the experts, connects to the expert shards' data plane (control calls
go through Serve handles; the per-layer tensors go over torch.distributed, see
moe.data_plane), and runs the continuous-batching engine on its own thread (moe.async_engine).
`generate` streams a request's outputs back to the ingress, one item per engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import torch

from cluster.config import RaymixSettings
from moe.async_engine import AsyncEngine, Sink
from moe.checkpoint import CheckpointReader
from moe.config import MixtralConfig
from moe.data_plane import RemoteExperts, Rendezvous, ShardLink, comm_device, open_store
from moe.engine import LLMEngine, pick_device, pick_dtype
from moe.eplb import balancedness, plan_replicas
from moe.errors import RequestError
from moe.experts import Placement, partition_experts
from moe.model import MixtralDense
from moe.sampling import SamplingParams
from moe.sequence import RequestOutput
from moe.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")


def wire(request_id: str, item: RequestOutput | BaseException) -> dict[str, Any]:
    """An output or a refusal as the ingress receives it."""
    if isinstance(item, RequestOutput):
        return dataclasses.asdict(item)
    if isinstance(item, RequestError):
        return {
            "request_id": request_id,
            "error": {"message": item.message, "param": item.param, "code": item.code},
        }
    return {
        "request_id": request_id,
        "error": {"message": str(item), "param": None, "code": None},
        "server_error": True,
    }


class Router:
    def __init__(
        self,
        settings: dict[str, Any],
        shards: list[Any],
        expert_groups: list[list[int]],
        num_threads: int | None,
    ):
        self.settings = s = RaymixSettings(**settings)
        self.num_threads = num_threads
        self.shards = shards
        self.expert_groups = expert_groups
        self.placement = Placement.from_groups(expert_groups)  # what the data plane routes by
        self.held = [list(g) for g in expert_groups]  # what each shard holds (primaries + replicas)
        self.base_shards = len(shards)  # this app's own; more come from `raymix scale` (resize)
        self._eplb_task: asyncio.Task | None = None
        self._gauges_task: asyncio.Task | None = None
        self._rebalancing = asyncio.Lock()
        self.model_dir = s.model_dir()
        self.cfg = MixtralConfig.from_pretrained(self.model_dir)
        self.device = pick_device("auto")
        self.backend = (
            s.data_plane if s.data_plane != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        self.timeout = datetime.timedelta(seconds=s.data_plane_timeout_s)
        self.sinks: dict[str, Sink] = {}  # one per ingress replica's stream
        self.owned: dict[str, set[str]] = {}  # request ids of each stream still running
        self.engine = AsyncEngine(self._build_engine, name="router-engine")

    def _build_engine(self) -> LLMEngine:
        """Runs on the engine thread: OpenMP's thread count is per thread, so it is set here."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        s, cfg = self.settings, self.cfg
        start = time.perf_counter()
        dtype = pick_dtype(s.dtype, cfg, self.device)
        model = MixtralDense.from_checkpoint(CheckpointReader(self.model_dir), cfg, dtype, self.device)
        tokenizer = load_tokenizer(self.model_dir, s.tokenizer_mode)
        experts = self._connect_shards()
        log.info(
            "router ready in %.1fs: dense part on %s, %d shards over %s",
            time.perf_counter() - start,
            self.device,
            len(self.shards),
            self.backend,
        )
        config = s.engine_config()
        config.overlap = s.overlap if s.overlap is not None else self.device.type == "cuda"
        return LLMEngine(cfg, model, experts, config, tokenizer, self.model_dir)

    def _connect_shards(self) -> RemoteExperts:
        """Open the rendezvous store, then have every shard join its own pair group with us."""
        import ray

        infos = [h.info.remote().result() for h in self.shards]
        here = ray.get_runtime_context().get_node_id()
        self._same_node = all(i["node_id"] == here for i in infos)
        self._host = "127.0.0.1" if self._same_node else ray.util.get_node_ip_address()
        if self._same_node:  # nothing listens on the network: a FileStore in a fresh directory
            self._store_dir = tempfile.mkdtemp(prefix="raymix-store-")
            self._url = f"file://{os.path.join(self._store_dir, 'store')}"
        else:
            self._url = f"tcp://{self._host}:{_free_port()}"
        self._store = open_store(self._url, is_master=True, timeout=self.timeout)
        links = [self._rejoin(k) for k in range(len(self.shards))]  # retried: shards may still be starting
        log.info("data plane up: %d shards, %s via %s", len(links), self.backend, self._url.split("://")[0])
        return RemoteExperts(
            links,
            self.placement,
            self.cfg.hidden_size,
            comm_device(self.backend, self.device),
            reconnect=self._rejoin,
        )

    def _join(self, k: int) -> ShardLink:
        """Ask shard k (the replica Serve routes to) to join a fresh pair group, and join it."""
        info = self.shards[k].info.remote().result()
        if sorted(info["expert_ids"]) != sorted(self.held[k]):  # a replacement: give back what it held
            self.shards[k].set_experts.remote(self.held[k]).result()
        interface = "127.0.0.1" if self._same_node else info["node_ip"]
        rdv = Rendezvous(self._url, f"shard{k}/{uuid.uuid4().hex[:8]}/", self.backend, interface)
        pending = self.shards[k].connect.remote(dataclasses.asdict(rdv))
        link = ShardLink(self._store, rdv, self.device, self.timeout, self._host)
        pending.result()
        return link

    def _rejoin(self, k: int) -> ShardLink:
        """Connect to shard k, retrying while its replica is (re)starting: at start-up, and after
        a shard failed (Serve replaces the replica; the new one is connected here, and given
        back the replicas its predecessor held before any layer is sent to it)."""
        start = time.monotonic()
        deadline = start + self.settings.shard_recovery_timeout_s
        while True:
            try:
                link = self._join(k)
                log.info("expert shard %d connected after %.1fs", k, time.monotonic() - start)
                return link
            except Exception as e:  # the old replica is still being replaced
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"expert shard {k} did not come back within the recovery timeout"
                    ) from e
                log.info("expert shard %d not back yet: %s", k, e)
                time.sleep(0.5)

    # ---- called by the ingress (see deployments/channel.py) ----

    async def stream(self, subscriber: str) -> AsyncIterator[list[dict[str, Any]]]:
        """Every output of one ingress replica's requests: one list per engine step (steps that
        piled up while the reader was busy come merged). Ending the stream aborts them all."""
        sink = self._sink(subscriber)
        try:
            while True:
                batch = sink.take_all(await sink.queue.get())
                for rid, item in batch:
                    if not isinstance(item, RequestOutput) or item.finished:
                        self.owned[subscriber].discard(rid)
                yield [wire(rid, item) for rid, item in batch]
        finally:
            self.sinks.pop(subscriber, None)
            for rid in self.owned.pop(subscriber, set()):
                self.engine.abort(rid)

    async def submit(self, subscriber: str, requests: list[dict[str, Any]]) -> None:
        """Add requests; their outputs (or refusals) arrive on the subscriber's stream."""
        if self.settings.eplb_interval_s and self._eplb_task is None:
            self._eplb_task = asyncio.create_task(self._eplb_loop(self.settings.eplb_interval_s))
        if self._gauges_task is None:
            self._gauges_task = asyncio.create_task(self._gauges_loop())
        sink = self._sink(subscriber)
        for r in requests:
            self.owned[subscriber].add(r["request_id"])
            self.engine.add(r["request_id"], r["prompt_token_ids"], SamplingParams(**r["params"]), sink)

    async def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)
            for owned in self.owned.values():
                owned.discard(rid)

    def _sink(self, subscriber: str) -> Sink:
        if subscriber not in self.sinks:
            self.sinks[subscriber] = Sink()
            self.owned[subscriber] = set()
        return self.sinks[subscriber]

    def _experts(self) -> RemoteExperts | None:
        """The data plane, once the engine thread has built it."""
        eng = self.engine.engine
        return eng.experts if eng is not None and isinstance(eng.experts, RemoteExperts) else None

    # ---- hot-expert replication (moe.eplb) ----

    async def rebalance(self) -> dict[str, Any]:
        """Re-plan the expert replicas from the load measured over the recent window and move
        to the plan while serving: load the new replicas, switch the routing, wait until no
        layer batch routed the old way is in flight, then drop what is no longer needed.
        → the plan, with the predicted balancedness (mean / max per shard) before and after."""
        experts = self._experts()
        n = self.settings.num_redundant_experts
        if experts is None or n == 0:
            return {
                "changed": False,
                "reason": "no data plane yet" if experts is None else "num_redundant_experts is 0",
            }
        async with self._rebalancing:
            load = experts.load.recent_expert_load()
            plan = plan_replicas(load, self.expert_groups, n)
            before = balancedness(load, self.placement.expert_shards, len(self.shards))
            after = balancedness(load, plan, len(self.shards))
            if plan == self.placement.expert_shards:
                return {"changed": False, "balancedness": before, "replicas": self._replicas(plan)}
            await self._move(experts, plan, len(self.shards))
            experts.load.reset_window()
            log.info(
                "experts rebalanced: balancedness %.3f -> %.3f, replicas %s",
                before,
                after,
                self._replicas(plan),
            )
            return {"changed": True, "before": before, "after": after, "replicas": self._replicas(plan)}

    async def _move(
        self,
        experts: RemoteExperts,
        plan: list[list[int]],
        num_shards: int,
        links: list[ShardLink] | None = None,
    ) -> None:
        """Go over to `plan` (per expert, the shards holding it) on the first `num_shards` shards
        while serving: 1. shards load what they will compute (keeping what they compute now),
        2. the routing switches (with `links`, to that set of shards), 3. wait until no layer
        batch routed the old way is in flight, 4. shards drop what they no longer compute."""
        new = Placement(plan, num_shards)
        want = [new.experts_on(k) if k < num_shards else [] for k in range(len(self.shards))]
        grow = [k for k in range(len(self.shards)) if set(want[k]) - set(self.held[k])]
        for k in grow:
            self.held[k] = sorted(set(self.held[k]) | set(want[k]))
        await asyncio.gather(*[self.shards[k].set_experts.remote(self.held[k]) for k in grow])
        calls = experts.calls
        self.placement = new
        experts.set_placement(new, links)
        await self._drain_old_routing(experts, calls)
        shrink = [k for k in range(len(self.shards)) if set(self.held[k]) - set(want[k])]
        for k in shrink:
            self.held[k] = want[k]
        await asyncio.gather(*[self.shards[k].set_experts.remote(want[k]) for k in shrink])

    async def resize(self, num_shards: int, extra_apps: list[str]) -> dict[str, Any]:
        """Elastic resizing: serve with `num_shards` expert shards from now on, without dropping
        a request. The first shards are this app's own; shards beyond them are the ExpertShard
        deployments of `extra_apps` (started by `raymix scale` before this call; after a shrink
        it deletes those no longer used). Experts are split anew (replicas start over) and moved
        as a rebalance moves them; shards left out hold nothing and are disconnected."""
        from ray import serve

        experts = self._experts()
        if experts is None:
            raise RuntimeError("the data plane is not up yet")
        if not 1 <= num_shards <= self.cfg.num_local_experts:
            raise ValueError(f"num_shards must be between 1 and {self.cfg.num_local_experts}")
        async with self._rebalancing:
            old_links = list(experts.links)
            old = len(old_links)
            for k, app in enumerate(extra_apps, start=self.base_shards):
                if k >= len(self.shards):
                    self.shards.append(serve.get_deployment_handle("ExpertShard", app_name=app))
                    self.held.append([])
            links = old_links[:num_shards]
            for k in range(len(links), num_shards):  # connect the new shards' data plane
                links.append(await asyncio.to_thread(self._rejoin, k))
            self.expert_groups = partition_experts(self.cfg.num_local_experts, num_shards)
            plan = Placement.from_groups(self.expert_groups).expert_shards
            await self._move(experts, plan, num_shards, links)
            for link in old_links[num_shards:]:  # say goodbye to the shards left out
                await asyncio.to_thread(link.shutdown)
            keep = max(num_shards, self.base_shards)
            del self.shards[keep:], self.held[keep:]
            experts.load.reset_window()
            log.info("expert shards resized %d -> %d: groups %s", old, num_shards, self.expert_groups)
            return {"expert_shards": num_shards, "expert_groups": self.expert_groups}

    @staticmethod
    def _replicas(plan: list[list[int]]) -> dict[str, list[int]]:
        return {str(e): shards for e, shards in enumerate(plan) if len(shards) > 1}

    async def _drain_old_routing(self, experts: RemoteExperts, calls: int, timeout: float = 30.0) -> None:
        """Layer batches posted before the switch are waited on before the next two layer
        calls complete (two micro-batches may be in flight); an idle engine has none."""
        deadline = time.monotonic() + timeout
        eng = self.engine.engine
        while experts.calls < calls + 2 and eng is not None and eng.has_unfinished():
            if time.monotonic() > deadline:
                raise RuntimeError("rebalance: layer batches of the old routing still in flight")
            await asyncio.sleep(0.005)

    async def _gauges_loop(self, interval: float = 1.0) -> None:
        """The engine's gauges through Ray's metrics export (deployments/ray_metrics.py)."""
        from deployments.ray_metrics import EngineGauges

        gauges = EngineGauges()
        while True:
            gauges.set(self.engine.stats)
            await asyncio.sleep(interval)

    async def _eplb_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rebalance()
            except Exception:
                log.exception("expert rebalancing failed; keeping the current replicas")

    async def expert_load(self) -> dict[str, Any]:
        experts = self._experts()
        return experts.load.snapshot() if experts else {}

    async def stats(self) -> dict[str, Any]:
        experts = self._experts()
        return {
            **self.engine.stats,
            "ready": self.engine.ready.is_set() and self.engine.error is None,
            "steps": self.engine.steps,
            "step_seconds": self.engine.step_seconds,
            "shard_recoveries": experts.recoveries if experts else 0,
            "expert_shards": len(experts.links) if experts else len(self.shards),
            "base_shards": self.base_shards,
            "expert_calls": experts.calls if experts else 0,
            "expert_seconds": experts.seconds if experts else 0.0,
        }

    async def model_info(self) -> dict[str, Any]:
        eng = self.engine.engine
        return {
            "max_model_len": eng.max_model_len if eng else None,
            "ready": eng is not None,
            "pid": os.getpid(),
        }

    def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"router engine failed to start: {self.engine.error}")
        if not self.engine.alive:
            raise RuntimeError("router engine loop stopped")

    def __del__(self):
        with contextlib.suppress(Exception):
            self.engine.stop(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
