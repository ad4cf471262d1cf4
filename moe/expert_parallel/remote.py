"""The router's end of the data plane: a link per shard, and RemoteExperts over them.

A Ray Serve handle call costs ~16 ms here against a ~0.2 ms transport floor, and a decode step
pays the hop once per layer, so the per-layer tensors do not go through Ray but over a pair
group per shard (moe.expert_parallel.rendezvous); Ray keeps the control plane. Per layer and
step the router sends each shard that has tokens one message (moe.expert_parallel.wire). On a
GPU router every shard gets the whole layer batch instead (n = T, the ids it does not compute
sent as -1; `whole_batch`): the sizes are then known without reading the routing, and posting
a layer costs no host sync.

Every receive is posted before the peer sends, because a gloo send that finds no receive posted
waits for a ready-to-receive notice from the other side (one more round trip of process
wake-ups: on this 2-core machine it made a 4-shard layer ~7x slower than the bare transport).
So the shard keeps a receive of `inline_tokens` tokens' worth of bytes posted at all times
(gloo accepts a message shorter than the buffer), and the router posts its receive of y when
it sends.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moe.expert_parallel.load import ExpertLoad
from moe.expert_parallel.placement import Placement, ShardBatch, assign, combine, dispatch, dispatch_whole
from moe.expert_parallel.rendezvous import ROUTER, SHARD, Rendezvous, comm_device, pair_group
from moe.expert_parallel.wire import BODY_TAG, HEAD_TAG, HEADER_BYTES, PING, SHUTDOWN, encode

log = logging.getLogger(__name__)


class ShardLink:
    """The router's end of one shard's pair group."""

    def __init__(
        self,
        store: dist.Store,
        rendezvous: Rendezvous,
        device: torch.device,
        timeout: datetime.timedelta,
        host: str = "127.0.0.1",
    ):
        self.rendezvous = rendezvous
        self.device = comm_device(rendezvous.backend, device)
        self.timeout = timeout
        self.pg = pair_group(store, rendezvous.prefix, ROUTER, rendezvous.backend, timeout, host)
        self.last_sent = time.monotonic()

    def send(self, layer: int, x: torch.Tensor, b: ShardBatch) -> list:
        """Post the sends of this shard's part of a layer batch → the pending works (wait on
        them): one message when it fits the shard's standing receive."""
        self.last_sent = time.monotonic()
        inline = b.token_index.numel() <= self.rendezvous.inline
        msg = encode(layer, x, b, inline, self.device)
        if inline:
            return [self.pg.send([msg], SHARD, HEAD_TAG)]
        return [
            self.pg.send([msg[:HEADER_BYTES]], SHARD, HEAD_TAG),
            self.pg.send([msg[HEADER_BYTES:]], SHARD, BODY_TAG),
        ]

    def recv(self, out: torch.Tensor):
        return self.pg.recv([out], SHARD, 0)

    def wait(self, work: Any) -> None:
        """Wait for one posted send or receive. NCCL: with no timeout it orders the stream and
        returns (with one, it blocks the host, polling every millisecond); its process group's
        own timeout catches a stuck shard. gloo: the link's timeout."""
        if self.rendezvous.backend == "nccl":
            work.wait()
        else:
            work.wait(self.timeout)

    def ping(self) -> None:
        """A header alone, unanswered: the shard knows this router is idle, not gone."""
        self.last_sent = time.monotonic()
        header = torch.tensor([PING, 0, 0, 0], dtype=torch.long, device=self.device)
        self.wait(self.pg.send([header.view(torch.uint8)], SHARD, HEAD_TAG))

    def shutdown(self) -> None:
        header = torch.tensor([SHUTDOWN, 0, 0, 0], dtype=torch.long, device=self.device)
        self.pg.send([header.view(torch.uint8)], SHARD, HEAD_TAG).wait(self.timeout)


class RemoteExperts:
    """An ExpertBackend whose experts live in other processes, reached over ShardLinks.

    Experts hold no per-request state, so a shard that dies costs no request: when a layer's
    exchange with shard k fails (its process is gone: the connection closes; or it stops
    answering within the timeout), `reconnect(k)` is called to get a link to its replacement
    (Ray restarts the replica; the router hands it a fresh rendezvous) and that shard's part
    of the layer is sent again. The step waits meanwhile; its outputs do not change.

    Where every expert of the dead shard has another holder (EPLB's replicas), nothing waits:
    its part of the layer goes to those holders at once, the layers after it are routed
    without it, and its replacement is connected on a thread of its own; the next layer after
    that routes to it again. Only experts with no other holder make a step wait.
    """

    def __init__(
        self,
        links: list[ShardLink],
        placement: Placement,
        hidden_size: int,
        device: torch.device,
        reconnect: Callable[[int], ShardLink] | None = None,
        max_retries: int = 3,
        whole_batch: bool | None = None,  # every shard gets all T tokens (default: on a GPU)
    ):
        self.routing = (placement.to(device), list(links))  # read once per layer: swapped whole
        self.whole_batch = device.type == "cuda" if whole_batch is None else whole_batch
        self.hidden_size = hidden_size
        self.device = device
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.seconds = 0.0  # time in submit + wait: dispatch, waiting for the shards, combine
        self.recoveries = 0  # shards replaced (the step waiting for it, or not: `failovers`)
        self.load = ExpertLoad(len(links), self.placement.primary)
        self.load.holders = self.placement.holders  # replicas too (a router restarted)
        self.down: set[int] = set()  # dead shards routed around while their replacements connect
        self.replaced: dict[int, ShardLink] = {}  # replacements connected, taken at the next submit
        self.replacing = threading.Lock()
        self.failovers = 0  # a dead shard's part sent to the other holders, no wait
        self.waits = 0  # a step waited for a dead shard's replacement

    def keepalive(self, idle_s: float) -> None:
        """Ping every link with nothing sent for idle_s (the engine thread calls this between
        steps and when idle): a shard hears from a live router well within its idle timeout. A
        link that fails here is left to the next layer's exchange, which reconnects it."""
        now = time.monotonic()
        for k, link in enumerate(self.links):
            if now - link.last_sent >= idle_s:
                try:
                    link.ping()
                except Exception as e:  # a dead shard: its next exchange reconnects
                    link.last_sent = now
                    log.info("keepalive to shard %d failed: %s", k, e)

    def set_placement(self, placement: Placement, links: list[ShardLink] | None = None) -> None:
        """Route by a new placement from the next layer on (each layer reads it once); with
        `links`, over a new set of shards (elastic resizing)."""
        placement = placement.to(self.device)
        if links is not None and len(links) != len(self.links):
            self.load.resize(len(links), placement.primary)
        self.routing = (placement, list(links) if links is not None else self.links)
        self.load.holders = placement.holders

    @property
    def placement(self) -> Placement:
        return self.routing[0]

    @property
    def links(self) -> list[ShardLink]:
        return self.routing[1]

    def _exchange(
        self, link: ShardLink, layer: int, x: torch.Tensor, b: ShardBatch, y: torch.Tensor
    ) -> tuple:
        """Post one shard's part of a layer → (the link used, its works, or None if posting failed)."""
        try:
            return link, [*link.send(layer, x, b), link.recv(y)]
        except RuntimeError:  # the pair group is already broken: wait() recovers
            return link, None

    def _route(self) -> tuple[Placement, list[ShardLink]]:
        """The placement and links a layer uses: replacements connected meanwhile taken back,
        dead shards left out while their replacements connect."""
        if self.replaced:
            with self.replacing:
                for k, link in self.replaced.items():
                    if k < len(self.links):
                        self.links[k] = link
                    self.down.discard(k)
                self.replaced.clear()
        placement, links = self.routing
        if self.down:
            around = placement.without(self.down)
            if around is not None:
                return around.to(self.device), links
        return placement, links

    def _replace(self, k: int) -> None:
        """On a thread of its own: connect shard k's replacement; the next layer takes it."""
        assert self.reconnect is not None
        try:
            link = self.reconnect(k)
        except Exception as e:
            log.error("expert shard %d could not be replaced: %s", k, e)
            return
        with self.replacing:
            self.replaced[k] = link
            self.recoveries += 1
        log.info("expert shard %d replaced; routing to it again", k)

    def _fail_over(self, k: int, layer: int, x: torch.Tensor, b: ShardBatch, y: torch.Tensor) -> bool:
        """Shard k died with its part b of a layer in flight: when every expert of it has another
        holder, compute b there (now, no wait for a replacement), leave k out of the routing
        until its replacement is connected on a thread, and write the result into y."""
        if self.reconnect is None:
            return False
        around = self.placement.without(self.down | {k})
        if around is None:
            return False
        self.failovers += 1
        if k not in self.down:  # (another micro-batch's part may have found it dead first)
            self.down.add(k)
            log.warning(
                "expert shard %d failed at layer %d: its experts' other holders take its part", k, layer
            )
            threading.Thread(target=self._replace, args=(k,), name=f"replace-shard-{k}", daemon=True).start()
        ids = b.expert_ids  # [n, K], -1 where another shard computes the assignment
        shard_of = assign(ids.clamp(min=0), around.to(ids.device))
        shard_of = torch.where(ids < 0, -1, shard_of)
        parts = []
        for s, sub in enumerate(dispatch(ids, b.weights, around, shard_of)):
            n = sub.token_index.numel()
            if n == 0:
                continue
            mine = ShardBatch(b.token_index[sub.token_index], sub.expert_ids, sub.weights)
            out = torch.empty(n, self.hidden_size, dtype=torch.float32, device=self.links[s].device)
            link, works = self._exchange(self.links[s], layer, x, mine, out)
            if works is None:
                raise RuntimeError(f"expert shard {s} failed too, while taking shard {k}'s part")
            for w in works:
                link.wait(w)
            parts.append((sub.token_index, out.to(y.device)))
        y.copy_(combine(y.shape, torch.float32, parts))
        return True

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Any:
        """Post the sends to, and the receives from, every shard that has tokens; don't wait."""
        start = time.perf_counter()
        placement, links = self._route()
        shard_of = assign(expert_ids, placement)  # [T, K]
        split = dispatch_whole if self.whole_batch else dispatch
        batches = split(expert_ids, weights, placement, shard_of)
        self.load.count(layer, expert_ids, shard_of, placement.num_shards)
        pending = []
        for k, b in enumerate(batches):
            n = b.token_index.numel()
            if n == 0:
                continue
            y = torch.empty(n, self.hidden_size, dtype=torch.float32, device=links[k].device)  # [n, H]
            pending.append((k, b, y, *self._exchange(links[k], layer, x, b, y)))
        self.seconds += time.perf_counter() - start
        return layer, x, pending, start

    def wait(self, handle: Any) -> torch.Tensor:
        start = time.perf_counter()
        layer, x, pending, posted = handle
        parts = []
        for k, b, y, link, works in pending:
            for attempt in range(self.max_retries + 1):
                try:
                    if works is None:
                        raise RuntimeError("could not post to the shard")
                    for w in works:
                        link.wait(w)
                    break
                except RuntimeError as e:  # gloo/NCCL: peer gone, or no answer within the timeout
                    if attempt == 0 and self._fail_over(k, layer, x, b, y):
                        break
                    if self.reconnect is None or attempt == self.max_retries:
                        raise
                    links = self.links
                    if k < len(links) and links[k] is link:  # not yet replaced (by another micro-batch)
                        log.warning("expert shard %d failed at layer %d (%s); reconnecting", k, layer, e)
                        links[k] = self.reconnect(k)
                        self.recoveries += 1
                        self.waits += 1
                    link, works = self._exchange(links[k] if k < len(links) else link, layer, x, b, y)
            self.load.latency(k, layer, time.perf_counter() - posted)
            parts.append((b.token_index, y.to(x.device, non_blocking=True)))
        out = combine(x.shape, x.dtype, parts)
        self.seconds += time.perf_counter() - start
        return out

    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def shutdown(self) -> None:
        for link in self.links:
            try:
                link.shutdown()
            except Exception as e:  # a shard already gone needs no goodbye
                log.info("shard link %s: %s", link.rendezvous.prefix, e)
