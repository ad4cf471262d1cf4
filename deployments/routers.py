"""Routers: an ingress replica's connection to every router (api.EngineClient over Ray).

One RouterClient per router deployment. Each request (all its choices together) goes to the
router RouterChoice picks: the one holding its prompt's prefix, else the least loaded. When a
router is lost (its stream breaks, or a submit fails), it is passed over until it answers
again, and its unfinished requests go on on another router from the tokens they had sent
(deployments.router_client): a stream does not fail with its router. With no router up, they
wait for one (RESUME_WAIT_S); a request that has lost MAX_ROUTER_LOSSES routers is failed, so
that one request that crashes routers cannot take them down one after another. The control plane: readiness and the context length from
any router that is up; stats from each (the metrics' `router` label); the expert view and
placement changes from router 0, the placement's owner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from typing import Any

from api.engine_client import Outputs
from api.errors import EngineUnavailable
from cluster.messages import (
    ExpertLoadSnapshot,
    ExpertStatus,
    GenerateRequest,
    ModelInfo,
    RebalanceResult,
    RouterStats,
    RouterStatus,
)
from deployments.router_choice import RouterChoice
from deployments.router_client import RouterClient

log = logging.getLogger("ray.serve")

PROBE_INTERVAL_S = 1.0  # how often a lost router is asked whether it is back
PROBE_TIMEOUT_S = 2.0
RESUME_WAIT_S = 120.0  # how long lost requests wait for a router to be up again (Serve replaces it)
MAX_ROUTER_LOSSES = 2  # a request that was running on this many routers that died is failed


class Routers:
    def __init__(self, routers: list[Any], block_size: int):
        self.clients = [
            RouterClient(h, lost=self._lost_on(i), broken=functools.partial(self._mark_down, i))
            for i, h in enumerate(routers)
        ]
        self.choice = RouterChoice(len(routers), block_size)
        self.up = [True] * len(routers)
        self.probes: dict[int, asyncio.Task] = {}
        self.waiting: set[asyncio.Task] = set()  # lost requests waiting for a router to be up

    def __len__(self) -> int:
        return len(self.clients)

    # ---- the request path ----

    def submit(self, requests: list[GenerateRequest]) -> Outputs:
        outputs = Outputs([r.request_id for r in requests], self._abort)
        self._send(requests, outputs)
        return outputs

    def _send(self, requests: list[GenerateRequest], outputs: Outputs) -> None:
        i = self.choice.pick(requests[0].prompt_token_ids, [c.in_flight for c in self.clients], self.up)
        self.clients[i].submit(requests, outputs)

    def _lost_on(self, i: int):
        def lost(requests: list[GenerateRequest], outputs: Outputs, error: EngineUnavailable) -> None:
            """Router i lost these (one HTTP request's unfinished choices): go on elsewhere."""
            if (n := max(r.attempt for r in requests)) >= MAX_ROUTER_LOSSES:
                names = ", ".join(r.request_id for r in requests)
                log.error("request %s lost %d routers: not retried", names, n)
                outputs.fail(
                    EngineUnavailable(f"request {names} was running on {n} routers that died; not retried")
                )
                return
            sent = sum(len(r.resumed_token_ids) for r in requests)
            log.info("router %d lost %d requests (%d tokens sent): resuming them", i, len(requests), sent)
            if any(self.up):
                self._send(requests, outputs)
            else:
                self.waiting.add(
                    asyncio.get_running_loop().create_task(self._send_when_up(requests, outputs, error))
                )

        return lost

    async def _send_when_up(
        self, requests: list[GenerateRequest], outputs: Outputs, error: EngineUnavailable
    ) -> None:
        """No router is up: wait (bounded) for one to answer again, then go on there."""
        deadline = asyncio.get_running_loop().time() + RESUME_WAIT_S
        while not any(self.up):
            if asyncio.get_running_loop().time() > deadline or not outputs.unfinished:
                outputs.fail(error)
                return
            await asyncio.sleep(PROBE_INTERVAL_S / 4)
        self._send(requests, outputs)

    def _abort(self, request_ids: list[str]) -> None:
        """Abort them on the router running them (a client's routes say which)."""
        for c in self.clients:
            if mine := [rid for rid in request_ids if rid in c.routes]:
                c.abort(mine)

    # ---- routers lost and back ----

    def _mark_down(self, i: int, error: Exception) -> None:
        if self.up[i]:
            log.warning("router %d lost (%s): sending new requests to the others", i, error)
        self.up[i] = False
        if i not in self.probes or self.probes[i].done():
            self.probes[i] = asyncio.get_running_loop().create_task(self._probe(i))

    async def _probe(self, i: int) -> None:
        """Ask router i until it answers ready (Serve has replaced it), then send to it again."""
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                info = await asyncio.wait_for(self.clients[i].model_info(), PROBE_TIMEOUT_S)
            except Exception:
                continue
            if info.ready:
                self.up[i] = True
                log.info("router %d is back", i)
                return

    # ---- the control plane ----

    async def _each(self, call: str, timeout: float = 10.0) -> list[Any]:
        """`call` on every router at once → its answer, or the exception, per router."""

        async def one(c: RouterClient) -> Any:
            return await asyncio.wait_for(getattr(c, call)(), timeout)

        return await asyncio.gather(*[one(c) for c in self.clients], return_exceptions=True)

    async def model_info(self) -> ModelInfo:
        infos = [i for i in await self._each("model_info") if isinstance(i, ModelInfo)]
        ready = [i for i in infos if i.ready]
        if ready:
            return ModelInfo(True, min(i.max_model_len or 0 for i in ready) or None, ready[0].pid)
        if infos:
            return infos[0]
        raise EngineUnavailable("no router answers")

    async def stats(self) -> list[RouterStats]:
        """Each router's that answers (one that does not is left out: it is down)."""
        every = [s for s in await self._each("stats") if isinstance(s, RouterStats)]
        if not every:
            raise EngineUnavailable("no router answers")
        return every

    async def expert_load(self) -> list[ExpertLoadSnapshot]:
        return [s for s in await self._each("expert_load") if isinstance(s, ExpertLoadSnapshot)]

    async def expert_status(self) -> ExpertStatus:
        """Router 0's view of the placement and the shards, the tokens per expert counted by
        every router, and each router's state."""
        status, stats = await asyncio.gather(self.clients[0].expert_status(), self.stats())
        shape = (status.num_layers, status.num_experts)
        routers = [
            RouterStatus(
                router=s.router,
                ready=s.ready,
                num_requests_running=s.engine.num_requests_running,
                num_requests_waiting=s.engine.num_requests_waiting,
                kv_cache_usage_perc=s.engine.kv_cache_usage_perc,
                prefix_cache_hit_rate=(
                    s.engine.prefix_cache_hits / s.engine.prefix_cache_queries
                    if s.engine.prefix_cache_queries
                    else None
                ),
            )
            for s in stats
        ]
        if len(self.clients) == 1:  # router 0's counts are every router's
            return dataclasses.replace(status, routers=routers)
        loads = await self.expert_load()
        return dataclasses.replace(
            status,
            routers=routers,
            recent_expert_tokens=_summed([s.recent_expert_tokens for s in loads], shape),
            expert_tokens=_summed([s.expert_tokens for s in loads], shape),
        )

    async def rebalance(self) -> RebalanceResult:
        return await self.clients[0].rebalance()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for task in [*self.probes.values(), *self.waiting]:
            task.cancel()


def _summed(counts: list[dict[int, list[int]]], shape: tuple[int, int]) -> list[list[int]]:
    """Several routers' {layer: [tokens per expert]} added up → [layer][expert]."""
    layers, experts = shape
    return [
        [sum(c.get(layer, [0] * experts)[e] for c in counts) for e in range(experts)]
        for layer in range(layers)
    ]
