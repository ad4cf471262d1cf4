"""Router: the Ray Serve deployment that hosts the engine (the dense part of the model).

Thin by design: the engine runs on its own thread (moe.engine.async_engine); the expert shards'
processes and data-plane links are the ShardPool's; which shard computes which expert is the
PlacementController's. What the router itself does is the engine host's job for the ingress:

    submit(subscriber, [GenerateRequest])    start requests; outputs go to the subscriber's stream
    drain(timeout_s)                         refuse new requests (503), wait for those in flight
    stream(subscriber)                       [RequestOutput | Refusal] per engine step, until closed
    abort([request id])                      stop requests now (a client went away)
    model_info / stats / expert_load         what /health, /metrics and the API read
    expert_status                            placement, shard health and recent load (the web page)
    rebalance / resize                       placement changes, delegated to the controller
    follow / recent_expert_load              with several routers: router 0's controller asks the others

With --routers M there are M Router deployments, each with its own engine, KV cache and shard
links (a pair group per shard); router 0 owns the placement (deployments/placement_controller.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch

from cluster.config import RaymixSettings
from cluster.messages import (
    EXPERT_SHARD,
    ExpertLoadSnapshot,
    ExpertStatus,
    GenerateRequest,
    ModelInfo,
    Output,
    PlacementSnapshot,
    RebalanceResult,
    Refusal,
    ResizeResult,
    RouterStats,
    ShardInfo,
    ShardStatus,
    router_deployment_name,
)
from deployments.placement_controller import PlacementController
from deployments.ray_metrics import RayEngineGauges, RayGpuMemory
from deployments.shard_pool import ShardPool
from moe.checkpoint.reader import open_checkpoint
from moe.engine.async_engine import AsyncEngine, Sink
from moe.engine.llm_engine import EngineStats, LLMEngine, gpu_memory, pick_device, pick_dtype
from moe.engine.sequence import RequestOutput
from moe.expert_parallel.backend import ExpertBackend, InProcessExperts
from moe.expert_parallel.remote import RemoteExperts
from moe.expert_parallel.rendezvous import comm_device
from moe.layers.cpu_gemm import kernel_for
from moe.models.transformer import DenseModel
from moe.tokenizer import load_tokenizer

log = logging.getLogger("ray.serve")


class ShuttingDown(RuntimeError):
    """A request that came while the router drains: refused as unavailable (503)."""


SHARD_HEALTH_TIMEOUT_S = 2.0  # a shard that does not answer `info` within this is shown unhealthy
UNOPENED_S = 60.0  # a subscriber that submitted but has not opened its stream in this long is gone


class Router:
    def __init__(
        self,
        settings: RaymixSettings,
        shards: list[Any],  # ExpertShard deployment handles
        expert_groups: list[list[int]],  # shard k's experts of every layer
        num_threads: int | None,
        gpu_share: float = 1.0,  # of its GPU (less when shards share it)
        router_id: int = 0,  # which of --routers
        followers: list[Any] | None = None,  # router 0: the other routers' handles
    ):
        self.settings = s = settings
        self.router_id = router_id
        self.num_threads = num_threads
        self.gpu_share = gpu_share
        self.model_dir = s.model_dir()
        self.cfg, self.quant, self.reader = open_checkpoint(self.model_dir, s.quantization)
        self.device = pick_device("auto")
        self.transport = (
            s.data_plane if s.data_plane != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        )
        self.sinks: dict[str, Sink] = {}  # one per ingress replica's stream
        self.owned: dict[str, set[str]] = {}  # request ids of each stream still running
        self.unopened: dict[str, float] = {}  # subscribers whose stream is not open yet: since when
        self.pool = ShardPool(
            shards,
            self.transport,
            self.device,
            datetime.timedelta(seconds=s.data_plane_timeout_s),
            s.shard_recovery_timeout_s,
            holding=lambda k: self.controller.holding(k),
            router=router_id,
            shared=s.routers > 1,
        )
        # no shards (--expert-shards 0, or a dense model): the experts, or the MLP, run here
        self.placement: PlacementController | None = None
        if expert_groups:
            self.placement = PlacementController(
                self.pool,
                expert_groups,
                self.cfg.num_local_experts,
                s.num_redundant_experts,
                data_plane=self._data_plane,
                between_steps=lambda fn: self.engine.between_steps(fn),
                followers=followers,
                owner=router_id == 0,
                expert_replicas=s.expert_replicas,
            )
        self.engine = AsyncEngine(self._build_engine, name="router-engine")
        self.draining = False  # set by drain(): new requests are refused
        # background work, started with the replica (the constructor runs on its event loop)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._export_gauges())]
        if s.eplb_interval_s and self.placement is not None and router_id == 0:  # the placement's owner
            self._tasks.append(loop.create_task(self.placement.run_eplb(s.eplb_interval_s)))
        if s.expert_replicas > 1 and self.placement is not None and router_id == 0:
            self._tasks.append(loop.create_task(self._replicate()))

    async def _replicate(self) -> None:
        """--expert-replicas: once the engine has connected the shards, every expert on more."""
        await asyncio.to_thread(self.engine.ready.wait)
        if self.engine.error is None:
            try:
                await self.controller.replicate()
            except Exception:
                log.exception("could not place every expert on %d shards", self.settings.expert_replicas)

    @property
    def controller(self) -> PlacementController:
        """The placement controller (none when there are no shards: --expert-shards 0, or a dense model)."""
        if self.placement is None:
            raise RuntimeError(
                "the experts run in the router's process: there are no shards to place them on"
            )
        return self.placement

    def _build_engine(self) -> LLMEngine:
        """Runs on the engine thread: OpenMP's thread count is per thread, so it is set here."""
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        s, cfg = self.settings, self.cfg
        start = time.perf_counter()
        dtype = pick_dtype(s.dtype, cfg, self.device)
        gemm = kernel_for(s.cpu_gemm, self.device, dtype)
        model = DenseModel.from_checkpoint(self.reader, cfg, dtype, self.device, self.quant, gemm)
        tokenizer = load_tokenizer(self.model_dir, s.tokenizer_mode)
        experts: ExpertBackend
        if self.placement is None:  # dense: the MLP is computed here
            experts = InProcessExperts.from_checkpoint(
                self.reader, cfg, dtype, self.device, 1, self.quant, gemm
            )
            where = "MLP here too (a dense model)"
        else:
            if self.settings.routers > 1:
                self._catch_up()
            num_shards = self.placement.placement.num_shards
            experts = RemoteExperts(
                self.pool.open()[:num_shards],
                self.placement.placement,
                cfg.hidden_size,
                comm_device(self.transport, self.device),
                reconnect=self.pool.rejoin,
            )
            where = f"{len(self.pool)} shards over {self.transport}"
        log.info(
            "router %d ready in %.1fs: dense part on %s (%s), %s",
            self.router_id,
            time.perf_counter() - start,
            self.device,
            self.quant.describe() if self.quant else dtype,
            where,
        )
        config = s.engine_config()
        if 0 < self.gpu_share < 1:  # shards share this GPU: the cache takes this router's share
            config.gpu_memory_utilization *= self.gpu_share
        # two micro-batches pay only where remote experts leave the router idle (GPUs, shards)
        remote = self.placement is not None
        config.overlap = s.overlap if s.overlap is not None else self.device.type == "cuda" and remote
        return LLMEngine(cfg, model, experts, config, tokenizer, self.model_dir)

    def _catch_up(self, timeout_s: float = 10.0) -> None:
        """Before connecting: if another router is serving (this one restarted), take its
        placement, so this one routes, and gives a replaced shard back, what the others do.
        Router 0 asks the others; the others ask router 0, the placement's owner."""
        from ray import serve

        try:  # no shard linked to a router: the first start-up, when every router waits on its own
            linked = any(h.info.remote().result(timeout_s=timeout_s).routers for h in self.pool.handles)
        except Exception:  # a shard still starting: nobody serves yet
            linked = False
        if not linked:
            return
        if self.router_id == 0:
            peers = list(self.controller.followers)
        else:
            app = serve.get_replica_context().app_name
            peers = [serve.get_deployment_handle(router_deployment_name(0), app_name=app)]
        for peer in peers:
            try:
                snap = peer.placement_snapshot.remote().result(timeout_s=timeout_s)
            except Exception as e:  # starting too, or gone: the start-up placement stands
                log.info("router %d: no placement from a peer (%s)", self.router_id, type(e).__name__)
                continue
            if snap is not None and snap.live:
                self.controller.adopt(snap)
                log.info(
                    "router %d: took the serving routers' placement (%d shards)",
                    self.router_id,
                    snap.num_shards,
                )
                return

    async def placement_snapshot(self) -> PlacementSnapshot | None:
        """This router's placement (for a router that restarts beside it), None without shards."""
        return self.placement.snapshot() if self.placement is not None else None

    def _data_plane(self) -> RemoteExperts | None:
        """The data plane, once the engine thread has built it."""
        eng = self.engine.engine
        return eng.experts if eng is not None and isinstance(eng.experts, RemoteExperts) else None

    # ---- the ingress's side (deployments/router_client.py) ----

    async def submit(self, subscriber: str, requests: list[GenerateRequest]) -> None:
        """Add requests; their outputs (or refusals) arrive on the subscriber's stream."""
        sink = self._sink(subscriber)
        if self.draining:
            sink.put([(r.request_id, ShuttingDown("the server is shutting down")) for r in requests])
            return
        for r in requests:
            self.owned[subscriber].add(r.request_id)
            log.info(
                "request %s: %d prompt tokens, max_tokens %d%s",
                r.request_id,
                len(r.prompt_token_ids),
                r.params.max_tokens,
                f", resumed after {len(r.resumed_token_ids)} output tokens" if r.attempt else "",
            )
            self.engine.add(
                r.request_id, r.prompt_token_ids, r.params, sink, r.resumed_token_ids, r.resumed_text_len
            )

    async def stream(self, subscriber: str) -> AsyncIterator[list[Output]]:
        """Every output of one ingress replica's requests: one list per engine step (steps that
        piled up while the reader was busy come merged). Ending the stream aborts them all."""
        sink = self._sink(subscriber)
        self.unopened.pop(subscriber, None)
        try:
            while True:
                batch: list[Output] = []
                for rid, item in sink.take_all(await sink.queue.get()):
                    out = item if isinstance(item, RequestOutput) else Refusal.from_exception(rid, item)
                    if isinstance(out, Refusal) or out.finished:
                        self.owned[subscriber].discard(rid)
                        how = (
                            out.message
                            if isinstance(out, Refusal)
                            else f"{out.finish_reason}, {out.num_output_tokens} tokens"
                        )
                        log.info("request %s done: %s", rid, how)
                    batch.append(out)
                yield batch
        finally:
            self.sinks.pop(subscriber, None)
            for rid in self.owned.pop(subscriber, set()):
                self.engine.abort(rid)

    async def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)
            for owned in self.owned.values():
                owned.discard(rid)

    def _sink(self, subscriber: str) -> Sink:
        if subscriber not in self.sinks:
            self._drop_unopened()
            self.sinks[subscriber] = Sink()
            self.owned[subscriber] = set()
            self.unopened[subscriber] = time.monotonic()
        return self.sinks[subscriber]

    def _drop_unopened(self) -> None:
        """A subscriber that submitted but never opened its stream within UNOPENED_S (its
        ingress replica died in between): its requests are aborted and its sink dropped."""
        now = time.monotonic()
        for subscriber, since in list(self.unopened.items()):
            if now - since > UNOPENED_S:
                del self.unopened[subscriber]
                self.sinks.pop(subscriber, None)
                for rid in self.owned.pop(subscriber, set()):
                    self.engine.abort(rid)
                log.warning("subscriber %s never opened its stream: its requests are aborted", subscriber)

    async def model_info(self) -> ModelInfo:
        eng = self.engine.engine
        return ModelInfo(
            ready=eng is not None, max_model_len=eng.max_model_len if eng else None, pid=os.getpid()
        )

    async def stats(self) -> RouterStats:
        experts = self._data_plane()
        return RouterStats(
            engine=self.engine.stats,
            ready=self.engine.ready.is_set() and self.engine.error is None and not self.draining,
            router=self.router_id,
            steps=self.engine.steps,
            step_seconds=self.engine.step_seconds,
            expert_seconds=experts.seconds if experts else 0.0,
            expert_shards=len(experts.links) if experts else len(self.pool),
            base_shards=self.pool.base,
            shard_recoveries=experts.recoveries if experts else 0,
            shard_failovers=experts.failovers if experts else 0,
            shard_waits=experts.waits if experts else 0,
            gpu_ids=list(self.pool.gpu[1]),
            data_plane_transports=[self.pool.backends.get(k) for k in range(len(self.pool))],
            gpu_memory={self.name: m} if (m := gpu_memory(self.device)) else {},
        )

    async def expert_load(self) -> ExpertLoadSnapshot | None:
        experts = self._data_plane()
        return dataclasses.replace(experts.load.snapshot(), router=self.router_id) if experts else None

    async def recent_expert_load(self) -> list[float]:
        """Token assignments per expert over the recent window (router 0 plans from every router's)."""
        experts = self._data_plane()
        return experts.load.recent_expert_load() if experts else [0.0] * self.cfg.num_local_experts

    async def follow(
        self, plan: list[list[int]], num_shards: int, held: list[list[int]], primaries: list[list[int]]
    ) -> None:
        """Router 0 moved the placement: switch to it between two steps."""
        await self.controller.follow(plan, num_shards, held, primaries)

    async def connect(self, num_shards: int, extra_apps: list[str], shard_deployment: str) -> None:
        """Router 0 resizes: connect the first `num_shards` shards (the new ones too)."""
        await self.controller.connect(num_shards, extra_apps, shard_deployment)

    async def disconnect(self, num_shards: int) -> None:
        """Router 0 resized: say goodbye to the shards past `num_shards`."""
        await self.controller.disconnect(num_shards)

    @property
    def name(self) -> str:
        """This router in metrics: router, router1, ..."""
        return router_deployment_name(self.router_id).lower()

    async def expert_status(self) -> ExpertStatus:
        """Where each expert is computed, whether each shard answers, and the recent load."""
        experts = self._data_plane()
        load = experts.load.snapshot() if experts else None
        cfg = self.cfg
        layers = range(cfg.num_moe_layers)

        def per_layer(counts: dict[int, list[int]]) -> list[list[int]]:
            return [counts.get(layer, [0] * cfg.num_local_experts) for layer in layers]

        pings = await asyncio.gather(*[self._ping(k) for k in range(len(self.pool))])
        dispatch = load.recent_dispatch_seconds if load else []
        shards = []
        for k, (info, problem) in enumerate(pings):
            placement = self.controller.placement
            computes = placement.experts_on(k) if k < placement.num_shards else []
            own = self.controller.primaries[k] if k < len(self.controller.primaries) else []
            seconds = dispatch[k] if k < len(dispatch) else {}
            shards.append(
                ShardStatus(
                    shard_id=k,
                    experts=computes,
                    replicas=[e for e in computes if e not in own],
                    healthy=not problem,
                    detail=problem,
                    transport=self.pool.backends.get(k),
                    dispatch_ms=[1000 * seconds[i] if i in seconds else None for i in layers],
                    pid=info.pid if info else None,
                    device=info.device if info else None,
                )
            )
        return ExpertStatus(
            ready=self.engine.ready.is_set() and self.engine.error is None,
            num_layers=cfg.num_moe_layers,
            num_experts=cfg.num_local_experts,
            num_redundant_experts=self.settings.num_redundant_experts,
            recent_expert_tokens=per_layer(load.recent_expert_tokens if load else {}),
            expert_tokens=per_layer(load.expert_tokens if load else {}),
            balancedness=load.balancedness if load else 1.0,
            shard_recoveries=experts.recoveries if experts else 0,
            shards=shards,
        )

    async def _ping(self, k: int) -> tuple[ShardInfo | None, str]:
        """Shard k's `info`, or why it did not answer (it died and Serve is replacing it)."""
        response = self.pool.handles[k].info.remote()
        try:
            return await asyncio.wait_for(response, SHARD_HEALTH_TIMEOUT_S), ""
        except asyncio.TimeoutError:
            response.cancel()
            return None, f"no answer within {SHARD_HEALTH_TIMEOUT_S:g}s"
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"[:200]

    # ---- placement changes (deployments/placement_controller.py) ----

    async def rebalance(self) -> RebalanceResult:
        """Re-plan the hot-expert replicas from the recent load and move to the plan while serving."""
        if self.placement is None:
            return RebalanceResult(
                changed=False, reason="the experts run in the router's process: no shards to balance"
            )
        return await self.placement.rebalance()

    async def resize(self, num_shards: int, extra_apps: list[str]) -> ResizeResult:
        """Serve with `num_shards` expert shards from now on (`raymix scale`)."""
        return await self.controller.resize(num_shards, extra_apps, EXPERT_SHARD)

    # ---- lifecycle ----

    async def drain(self, timeout_s: float) -> EngineStats:
        """The first step of a shutdown: from now on new requests are refused (503, and /health
        says 503 so load balancers stop sending), and this returns once the requests in flight
        have finished, or after timeout_s. → the engine's gauges at that moment."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        # requests the engine runs, and those submitted but not yet in it (still in its inbox)
        while any(self.owned.values()) or (
            self.engine.engine is not None and self.engine.engine.has_unfinished()
        ):
            if time.monotonic() > deadline:
                log.warning("drain: requests still running after %.0fs; stopping anyway", timeout_s)
                break
            await asyncio.sleep(0.1)
        return self.engine.stats

    async def _export_gauges(self, interval: float = 1.0) -> None:
        """The engine's gauges through Ray's metrics export (deployments/ray_metrics.py)."""
        gauges, memory = RayEngineGauges(self.router_id), RayGpuMemory(self.name)
        while True:
            gauges.set(self.engine.stats)
            memory.set(gpu_memory(self.device))
            await asyncio.sleep(interval)

    async def check_health(self) -> None:
        """Serve's first call is part of the replica's start-up (no timeout there): it waits for
        the engine thread's build, so an engine that cannot be built fails the start-up with
        its own error (`raymix serve` prints it; a RayService's status shows it) rather than
        a health check later, which Serve would answer with restarts."""
        if not self.engine.ready.is_set():
            await asyncio.to_thread(self.engine.ready.wait)
        if self.engine.error is not None:
            raise RuntimeError(str(self.engine.error))  # the build's own error, in one line
        if not self.engine.alive:
            raise RuntimeError("router engine loop stopped")

    def __del__(self):
        for task in getattr(self, "_tasks", []):
            task.cancel()
        with contextlib.suppress(Exception):
            self.engine.stop(timeout=5)
