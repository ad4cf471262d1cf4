"""RouterClient: an ingress replica's one connection to one router (deployments.routers holds one per router).

Ray Serve moves each streamed item as its own message, and a message costs far more CPU than a
token's worth of text. So an ingress replica does not open a stream per request: it keeps one
streaming call to `Router.stream` that carries, per engine step, the outputs of all its
requests, and submits new requests in batches (whatever arrived while the previous submit was
in flight goes in the next). Each step's outputs go to the `Outputs` of the HTTP request they
belong to.

Every request keeps, until it finishes, what it needs to continue elsewhere: the output tokens
already delivered. If the stream breaks (the router died or restarted), every unfinished request
is handed to `lost` with those tokens (`GenerateRequest.resumed_token_ids`) and one more router
lost (`attempt`): deployments.routers sends it to another router, which prefills the prompt and
them and continues, so the client's stream goes on with no token repeated or missing. The next
request opens a new stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.engine_client import Outputs
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
from moe.engine.sequence import RequestOutput

log = logging.getLogger("ray.serve")
SUBMIT_TIMEOUT_S = 30.0  # handing requests to a router: a queue put there, normally milliseconds


Lost = Callable[[list[GenerateRequest], Outputs, EngineUnavailable], None]


@dataclass
class Flight:
    """One unfinished request sent to this router: what it feeds, and what it delivered."""

    request: GenerateRequest  # as submitted
    outputs: Outputs  # the HTTP request's outputs it feeds
    tokens: list[int] = field(default_factory=list)  # output tokens delivered from this router
    text_len: int = 0  # and the characters of their text
    accepted: bool = False  # the router took it (a submit returned, or an output came)

    def resumed(self) -> GenerateRequest:
        """The request to go on elsewhere: after what it delivered, one more router lost if
        this one had taken it."""
        r = self.request
        return dataclasses.replace(
            r,
            resumed_token_ids=r.resumed_token_ids + self.tokens,
            resumed_text_len=r.resumed_text_len + self.text_len,
            attempt=r.attempt + self.accepted,
        )


class RouterClient:
    def __init__(
        self,
        router: Any,
        lost: Lost,
        broken: Callable[[EngineUnavailable], None],
    ):
        self.router = router  # the Router deployment's handle
        self.lost = lost  # takes each group's unfinished requests, ready to resume, when the router is lost
        self.broken = broken  # told when the stream breaks or a submit fails
        self.subscriber = ""
        self.routes: dict[str, Flight] = {}  # request id -> the unfinished request
        self.pending: list[GenerateRequest] = []
        self.reader: asyncio.Task | None = None
        self.flusher: asyncio.Task | None = None

    def submit(self, requests: list[GenerateRequest], outputs: Outputs) -> None:
        """Start one group of requests (an HTTP request's choices) here; their outputs feed `outputs`."""
        self._ensure_reader()
        for r in requests:
            self.routes[r.request_id] = Flight(r, outputs)
        self.pending += requests
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())

    @property
    def in_flight(self) -> int:
        return len(self.routes)

    async def model_info(self) -> ModelInfo:
        return await self.router.model_info.remote()

    async def stats(self) -> RouterStats:
        return await self.router.stats.remote()

    async def expert_load(self) -> ExpertLoadSnapshot | None:
        return await self.router.expert_load.remote()

    async def expert_status(self) -> ExpertStatus:
        return await self.router.expert_status.remote()

    async def rebalance(self) -> RebalanceResult:
        return await self.router.rebalance.remote()

    def close(self) -> None:
        """End the stream (the router then aborts whatever of ours still runs)."""
        if self.reader is not None:
            self.reader.cancel()

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.routes.pop(rid, None)
        self.router.abort.remote(request_ids)  # fire and forget: the caller may be cancelled

    def _ensure_reader(self) -> None:
        if self.reader is None or self.reader.done():
            self.subscriber = f"ingress-{uuid.uuid4().hex[:12]}"
            self.reader = asyncio.get_running_loop().create_task(self._read(self.subscriber))

    async def _read(self, subscriber: str) -> None:
        error = EngineUnavailable("the router closed the stream")
        stream = self.router.options(stream=True).stream.remote(subscriber)
        try:
            async for batch in stream:
                self._deliver(batch)
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:
            error = EngineUnavailable(f"lost the router: {e}")
            log.warning("router stream %s ended: %s", subscriber, e)
        self._fail(list(self.routes), error)

    def _deliver(self, batch: list[Output]) -> None:
        """One engine step's outputs, one put per HTTP request."""
        groups: dict[int, tuple[Outputs, list[Output]]] = {}
        for item in batch:
            flight = self.routes.get(item.request_id)
            if flight is None:
                continue  # aborted meanwhile
            groups.setdefault(id(flight.outputs), (flight.outputs, []))[1].append(item)
            if isinstance(item, RequestOutput):
                flight.tokens += item.new_token_ids
                flight.text_len += len(item.new_text)
                flight.accepted = True
            if isinstance(item, Refusal) or item.finished:
                del self.routes[item.request_id]
        for outputs, items in groups.values():
            outputs.put(items)

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = [r for r in self.pending if r.request_id in self.routes], []
            if not batch:  # aborted, or failed over to another router meanwhile
                return
            ids = [r.request_id for r in batch]
            try:  # bounded: a router that hangs fails these requests over, as one that died
                await asyncio.wait_for(self.router.submit.remote(self.subscriber, batch), SUBMIT_TIMEOUT_S)
            except Exception as e:
                self.router.abort.remote(ids)  # in case it took them after all: not run twice
                self._fail(ids, EngineUnavailable(f"could not submit to the router: {e}"))
            else:
                for rid in ids:
                    if (flight := self.routes.get(rid)) is not None:
                        flight.accepted = True

    def _fail(self, request_ids: list[str], error: EngineUnavailable) -> None:
        """These requests are lost here. Each HTTP request's unfinished ones go to `lost`
        together, each with the output tokens and text it delivered (another router continues
        after them) and, if this router had taken it, one more router lost."""
        gone = set(request_ids)
        self.pending = [r for r in self.pending if r.request_id not in gone]  # never sent here now
        self.broken(error)
        groups: dict[int, tuple[Outputs, list[GenerateRequest]]] = {}
        for rid in request_ids:
            if (flight := self.routes.pop(rid, None)) is not None:
                groups.setdefault(id(flight.outputs), (flight.outputs, []))[1].append(flight.resumed())
        for outputs, requests in groups.values():
            self.lost(requests, outputs, error)
