"""PlacementController: the one owner of the expert placement (which shard computes which expert).

It holds the placement the data plane routes by and what each shard holds (primaries plus
replicas), and changes them while serving, for hot-expert replication (EPLB, `rebalance`) and
elastic resizing (`resize`), always the same way: 1. shards load what they will compute
(keeping what they compute now), 2. the engine switches its routing between two steps (a typed
command through its inbox, moe.engine.async_engine: run on the engine thread when no step is in flight,
so no step mixes placements and no layer batch routed the old way is left in flight), 3. shards
drop what they no longer compute. Every (token, expert) pair is computed exactly once
throughout, so no output changes.

With several routers (--routers M) router 0's controller is the owner: it plans from every
router's measured load, and in step 2 every router switches (each between two of its own
steps) before any shard drops an expert, so no shard is ever sent an expert it no longer holds.
The other routers' controllers follow (`follow`): they keep the owner's placement and holdings,
which is what a replaced shard is given back when one of them reconnects it first. A resize
adds a step 0, every router connecting the new shards (`connect`), and a step 4, every router
saying goodbye to the shards left out (`disconnect`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cluster.messages import EXPERT_SHARD, PlacementSnapshot, RebalanceResult, ResizeResult
from deployments.shard_pool import CALL_TIMEOUT_S, LOAD_TIMEOUT_S, ShardPool
from moe.expert_parallel.eplb import balancedness, plan_replicas
from moe.expert_parallel.placement import Placement, partition_experts
from moe.expert_parallel.remote import RemoteExperts, ShardLink

log = logging.getLogger("ray.serve")


async def bounded(timeout_s: float, what: str, *aws: Awaitable[Any]) -> list[Any]:
    """The awaitables' results, gathered, or a TimeoutError naming what did not finish: no wait
    in a placement change is unbounded (the change's lock is released, and the next can run)."""
    try:
        return await asyncio.wait_for(asyncio.gather(*aws), timeout_s)
    except TimeoutError:
        raise TimeoutError(f"placement change: {what} did not finish within {timeout_s:g} s") from None


class PlacementController:
    def __init__(
        self,
        pool: ShardPool,
        primaries: list[list[int]],  # shard k's own experts (replicas come on top)
        num_experts: int,
        num_redundant_experts: int,
        data_plane: Callable[[], RemoteExperts | None],  # None until the engine has connected
        between_steps: Callable[[Callable[[Any], Any]], Awaitable[Any]],  # run on the engine thread
        followers: list[Any] | None = None,  # the other routers' handles (this one owns the placement)
        owner: bool = True,  # False: another router's controller owns the placement
        expert_replicas: int = 1,  # shards holding each expert (--expert-replicas)
    ):
        self.next_links: list[ShardLink] | None = None  # a resize's links, between connect and the switch
        self.old_links: list[ShardLink] = []  # the links before it, until disconnect
        self.followers = followers or []
        self.owner = owner
        self.pool = pool
        self.primaries = primaries
        self.num_experts = num_experts
        self.num_redundant_experts = num_redundant_experts
        self.expert_replicas = expert_replicas
        self.placement = Placement.from_groups(primaries)  # what the data plane routes by
        self.held = [list(g) for g in primaries]  # what each shard holds (primaries + replicas)
        self.data_plane = data_plane
        self.between_steps = between_steps
        self.extra_apps: list[str] = []  # shard applications beyond the app's own (a resize's)
        self._changing = asyncio.Lock()

    def holding(self, k: int) -> list[int]:
        return self.held[k]

    def snapshot(self) -> PlacementSnapshot:
        return PlacementSnapshot(
            live=self.data_plane() is not None,
            plan=self.placement.expert_shards,
            num_shards=self.placement.num_shards,
            held=[list(h) for h in self.held],
            primaries=[list(p) for p in self.primaries],
            extra_apps=list(self.extra_apps),
        )

    def adopt(self, snap: PlacementSnapshot) -> None:
        """Before connecting (a router that restarted while others serve): their placement."""
        self.pool.add(snap.extra_apps, EXPERT_SHARD)
        self.pool.truncate(snap.num_shards)
        self.extra_apps = list(snap.extra_apps)
        self.placement = Placement(snap.plan, snap.num_shards)
        self.primaries = [list(p) for p in snap.primaries]
        self.held = [list(h) for h in snap.held][: len(self.pool)]
        self.held += [[] for _ in range(len(self.pool) - len(self.held))]

    async def replicate(self) -> None:
        """--expert-replicas r: every expert also on the r - 1 shards after its primary, moved to
        as a rebalance is (grow, switch, shrink) once the data plane is up."""
        num_shards = len(self.pool)
        r = min(self.expert_replicas, num_shards)
        if r < 2 or not self.owner:
            return
        primary = {e: s for s, g in enumerate(self.primaries) for e in g}
        plan = [[(primary[e] + j) % num_shards for j in range(r)] for e in range(self.num_experts)]
        async with self._changing:
            if plan != self.placement.expert_shards:
                await self._move(plan, num_shards)
                log.info("every expert on %d shards (--expert-replicas)", r)

    async def rebalance(self) -> RebalanceResult:
        """Re-plan the expert replicas from the load measured over the recent window and move
        to the plan while serving. → the plan, with the predicted balancedness (mean / max per
        shard) before and after."""
        experts = self.data_plane()
        n = self.num_redundant_experts
        if not self.owner:
            return RebalanceResult(changed=False, reason="router 0 owns the placement: ask it")
        if self.expert_replicas > 1:
            return RebalanceResult(
                changed=False, reason=f"every expert is on {self.expert_replicas} shards (--expert-replicas)"
            )
        if experts is None or n == 0:
            return RebalanceResult(
                changed=False,
                reason="no data plane yet" if experts is None else "num_redundant_experts is 0",
            )
        async with self._changing:
            load = experts.load.recent_expert_load()
            loads = [f.recent_expert_load.remote() for f in self.followers]
            for other in await bounded(CALL_TIMEOUT_S, "a router's expert load", *loads):
                load = [a + b for a, b in zip(load, other, strict=True)]  # every router's tokens
            plan = plan_replicas(load, self.primaries, n)
            num_shards = len(self.pool)
            before = balancedness(load, self.placement.expert_shards, num_shards)
            after = balancedness(load, plan, num_shards)
            if plan == self.placement.expert_shards:
                return RebalanceResult(changed=False, balancedness=before, replicas=_replicas(plan))
            await self._move(plan, num_shards)
            experts.load.reset_window()
            log.info(
                "experts rebalanced: balancedness %.3f -> %.3f, replicas %s", before, after, _replicas(plan)
            )
            return RebalanceResult(changed=True, before=before, after=after, replicas=_replicas(plan))

    async def resize(self, num_shards: int, extra_apps: list[str], shard_deployment: str) -> ResizeResult:
        """Serve with `num_shards` expert shards from now on, without dropping a request. The
        first shards are the app's own; shards beyond them are the deployments of
        `extra_apps` (started by `raymix scale` before this call). Experts are split anew
        (replicas start over); shards left out hold nothing and are disconnected."""
        experts = self.data_plane()
        if experts is None:
            raise RuntimeError("the data plane is not up yet")
        if not 1 <= num_shards <= self.num_experts:
            raise ValueError(f"num_shards must be between 1 and {self.num_experts}")
        if not self.owner:
            raise ValueError("router 0 owns the placement: ask it to resize")
        async with self._changing:
            old = len(experts.links)
            await self.connect(num_shards, extra_apps, shard_deployment)
            # every other router connects the new shards too, before any expert moves
            await bounded(
                LOAD_TIMEOUT_S,
                "the other routers connecting the shards",
                *[f.connect.remote(num_shards, extra_apps, shard_deployment) for f in self.followers],
            )
            self.primaries = partition_experts(self.num_experts, num_shards)
            await self._move(Placement.from_groups(self.primaries).expert_shards, num_shards)
            await bounded(
                LOAD_TIMEOUT_S,
                "disconnecting the shards left out",
                self.disconnect(num_shards),
                *[f.disconnect.remote(num_shards) for f in self.followers],
            )
            log.info("expert shards resized %d -> %d: groups %s", old, num_shards, self.primaries)
            return ResizeResult(expert_shards=num_shards, expert_groups=self.primaries)

    async def connect(self, num_shards: int, extra_apps: list[str], shard_deployment: str) -> None:
        """The first step of a resize, on every router: the shard handles beyond the app's own,
        and links to the first `num_shards` (new ones connected), kept for the switch."""
        experts = self.data_plane()
        if experts is None:
            raise RuntimeError("the data plane is not up yet")
        self.pool.add(extra_apps, shard_deployment)
        self.extra_apps = list(extra_apps)
        self.held += [[] for _ in range(len(self.pool) - len(self.held))]
        links = list(experts.links[:num_shards])
        for k in range(len(links), num_shards):  # connect the new shards' data plane
            links.append(await asyncio.to_thread(self.pool.rejoin, k))
        self.next_links = links if num_shards != len(experts.links) else None  # as many: they stay

    async def disconnect(self, num_shards: int) -> None:
        """The last step of a resize, on every router: goodbye to the shards left out."""
        experts = self.data_plane()
        for link in self.old_links[num_shards:]:
            await asyncio.to_thread(link.shutdown)
        self.old_links = []
        self.pool.truncate(num_shards)
        del self.held[len(self.pool) :]
        if experts is not None:
            experts.load.reset_window()

    async def run_eplb(self, interval_s: float) -> None:
        """Rebalance every `interval_s` seconds, for as long as the router lives."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.rebalance()
            except Exception:
                log.exception("expert rebalancing failed; keeping the current replicas")

    async def _move(self, plan: list[list[int]], num_shards: int) -> None:
        """Go over to `plan` (per expert, the shards holding it) on the first `num_shards`
        shards (in a resize, over the links `connect` made), in the steps of the module docstring."""
        new = Placement(plan, num_shards)
        handles = self.pool.handles
        want = [new.experts_on(k) if k < num_shards else [] for k in range(len(handles))]
        grow = [k for k in range(len(handles)) if set(want[k]) - set(self.held[k])]
        for k in grow:
            self.held[k] = sorted(set(self.held[k]) | set(want[k]))
        # every router knows the grown holdings before any shard grows: one that reconnects a
        # replaced shard meanwhile gives it those, not the ones before
        old = self.placement
        await bounded(
            CALL_TIMEOUT_S,
            "the other routers taking the grown holdings",
            *[
                f.follow.remote(old.expert_shards, old.num_shards, self.held, self.primaries)
                for f in self.followers
            ],
        )
        await bounded(
            LOAD_TIMEOUT_S,
            "shards loading their new experts",
            *[handles[k].set_experts.remote(self.held[k]) for k in grow],
        )
        self.placement = new
        # the engine switches between two steps: no step routes some layers one way and some the
        # other, and no layer batch of the old routing is in flight once this returns
        await bounded(
            LOAD_TIMEOUT_S,
            "every router switching to the new placement",
            self._switch(new),
            *[f.follow.remote(plan, num_shards, self.held, self.primaries) for f in self.followers],
        )
        shrink = [k for k in range(len(handles)) if set(self.held[k]) - set(want[k])]
        for k in shrink:
            self.held[k] = want[k]
        await bounded(
            LOAD_TIMEOUT_S,
            "shards dropping the experts they no longer hold",
            *[handles[k].set_experts.remote(want[k]) for k in shrink],
        )
        await bounded(
            CALL_TIMEOUT_S,
            "the other routers taking the shrunk holdings",
            *[f.follow.remote(plan, num_shards, self.held, self.primaries) for f in self.followers],
        )

    async def follow(
        self, plan: list[list[int]], num_shards: int, held: list[list[int]], primaries: list[list[int]]
    ) -> None:
        """The owner's placement (a follower's side of `_move`): hold its view of the shards, and
        switch this router's routing between two of its steps if the plan changed."""
        self.held, self.primaries = [list(h) for h in held], [list(p) for p in primaries]
        if plan == self.placement.expert_shards and num_shards == self.placement.num_shards:
            return
        new = Placement(plan, num_shards)
        self.placement = new
        await self._switch(new)
        experts = self.data_plane()
        if experts is not None:
            experts.load.reset_window()

    async def _switch(self, new: Placement) -> None:
        """This router's routing to `new` between two of its steps (over a resize's new links)."""
        links, self.next_links = self.next_links, None
        if links is not None:
            experts = self.data_plane()
            self.old_links = list(experts.links) if experts is not None else []
        await self.between_steps(lambda engine: engine.experts.set_placement(new, links))


def _replicas(plan: list[list[int]]) -> dict[str, list[int]]:
    return {str(e): shards for e, shards in enumerate(plan) if len(shards) > 1}
