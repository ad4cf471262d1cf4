"""EngineClient: what the API needs of whoever runs the engine, and `Outputs`, one request's stream.

The API submits the choices of one HTTP request together and reads their outputs back from one
`Outputs` (one queue, whatever the number of choices). Two hosts implement the protocol: the
router deployments over Ray (deployments.routers.Routers) and, with no Ray at all,
`LocalEngineClient` around an in-process `AsyncEngine` (tests, scripts).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import Protocol

from api.errors import EngineUnavailable
from cluster.messages import (
    ExpertLoadSnapshot,
    ExpertStatus,
    GenerateRequest,
    ModelInfo,
    Output,
    RebalanceResult,
    Refusal,
    RouterStats,
)
from moe.engine.async_engine import AsyncEngine, Item, Sink
from moe.engine.sequence import RequestOutput


class Outputs:
    """The outputs of a group of engine requests (one HTTP request's choices), as they come.

    The host feeds it (`put`, `fail`) on the event loop; the API reads it (`next`) until
    every request has finished or been refused. `close()` aborts whatever has not finished, so
    a reader that leaves early (a client gone, a timeout) frees the engine's KV blocks."""

    def __init__(self, request_ids: list[str], abort: Callable[[list[str]], None]):
        self.unfinished = set(request_ids)
        self._abort = abort
        self._queue: asyncio.Queue[list[Output] | BaseException] = asyncio.Queue()
        self._ready: deque[Output] = deque()

    def put(self, items: list[Output]) -> None:
        self._queue.put_nowait(items)

    def fail(self, error: BaseException) -> None:
        self._queue.put_nowait(error)

    async def next(self) -> Output:
        while not self._ready:
            batch = await self._queue.get()
            if isinstance(batch, BaseException):
                self.unfinished.clear()  # the host is gone, and so are its requests
                raise batch
            self._ready.extend(batch)
        item = self._ready.popleft()
        if isinstance(item, Refusal) or item.finished:
            self.unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        if self.unfinished:
            self._abort(sorted(self.unfinished))
            self.unfinished.clear()


class EngineClient(Protocol):
    def submit(self, requests: list[GenerateRequest]) -> Outputs:
        """Start the requests; their outputs (or refusals) arrive on the returned `Outputs`."""
        ...

    async def model_info(self) -> ModelInfo: ...

    async def stats(self) -> list[RouterStats]:
        """Per router (one in-process): readiness, the engine's gauges and counters
        (num_requests_running, kv_cache_usage_perc, ...)."""
        ...

    async def expert_load(self) -> list[ExpertLoadSnapshot]:
        """Per router with shards: tokens per expert per layer, per-shard dispatch latency."""
        ...

    async def expert_status(self) -> ExpertStatus:
        """The placement, each shard's health and the recent load (no shards in-process)."""
        ...

    async def rebalance(self) -> RebalanceResult:
        """Re-plan the hot-expert replicas from the recent load (EPLB) and move to the plan."""
        ...


class _OutputsSink(Sink):
    """An AsyncEngine sink that feeds one `Outputs`, refusals typed as the router types them."""

    def __init__(self, outputs: Outputs) -> None:
        super().__init__()
        self.outputs = outputs

    def put(self, batch: list[tuple[str, Item]]) -> None:  # from the engine thread
        items: list[Output] = [
            item if isinstance(item, RequestOutput) else Refusal.from_exception(rid, item)
            for rid, item in batch
        ]
        self.deliver(self.outputs.put, items)


class LocalEngineClient:
    """The engine in this process (its own thread), no Ray: for tests and scripts."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def submit(self, requests: list[GenerateRequest]) -> Outputs:
        if not self.engine.alive:
            raise EngineUnavailable(f"the engine is not running ({self.engine.error})")
        outputs = Outputs([r.request_id for r in requests], self._abort)
        sink = _OutputsSink(outputs)
        for r in requests:
            self.engine.add(
                r.request_id, r.prompt_token_ids, r.params, sink, r.resumed_token_ids, r.resumed_text_len
            )
        return outputs

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)

    async def model_info(self) -> ModelInfo:
        await asyncio.to_thread(self.engine.ready.wait)
        eng = self.engine.engine
        return ModelInfo(eng is not None, eng.max_model_len if eng else None, os.getpid())

    async def stats(self) -> list[RouterStats]:
        return [
            RouterStats(
                engine=self.engine.stats,
                ready=self.engine.ready.is_set() and self.engine.error is None,
                steps=self.engine.steps,
                step_seconds=self.engine.step_seconds,
            )
        ]

    async def expert_load(self) -> list[ExpertLoadSnapshot]:
        return []

    async def expert_status(self) -> ExpertStatus:
        await asyncio.to_thread(self.engine.ready.wait)
        eng = self.engine.engine
        layers, experts = (eng.cfg.num_moe_layers, eng.cfg.num_local_experts) if eng else (0, 0)
        empty = [[0] * experts for _ in range(layers)]
        return ExpertStatus(
            ready=eng is not None and self.engine.error is None,
            num_layers=layers,
            num_experts=experts,
            num_redundant_experts=0,
            recent_expert_tokens=empty,
            expert_tokens=empty,
            balancedness=1.0,
            shard_recoveries=0,
            shards=[],  # the experts run in this process
        )

    async def rebalance(self) -> RebalanceResult:
        return RebalanceResult(
            changed=False, reason="the experts run in-process: there are no shards to balance"
        )
