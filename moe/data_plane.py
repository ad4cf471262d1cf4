"""The expert data plane: the per-layer traffic between the router and its expert shards.

A Ray Serve handle call costs ~16 ms here against a ~0.2 ms transport floor, and a decode step
pays the hop once per layer, so the per-layer tensors do not go through Ray: each shard and the
router share a two-rank torch.distributed process group of their own (gloo on CPU, NCCL on
GPU), rendezvoused through a store the router opens (a FileStore when every shard shares the
router's node, so nothing listens on the network; a TCPStore across nodes). One pair group per
shard (rather than one world) keeps shards independent: a restarted shard reconnects under a new key prefix without
touching the others. Ray keeps the control plane: placing, starting and restarting the shards,
and telling each where to connect.

Per layer and step the router sends each shard that has tokens one message, a byte buffer:
a header [op, layer, n, inline] (int64), the routing [n, 2K] (float32: the K global expert ids
it is to compute, -1 for the others, then their K weights) and the hidden states x [n, H] (model
dtype). The shard answers with its weighted sum y [n, H]. On a GPU router every shard gets the
whole layer batch instead (n = T, the ids it does not compute sent as -1; `whole_batch`): the
sizes are then known without reading the routing, and posting a layer costs no host sync.

Every receive is posted before the peer sends, because a gloo send that finds no receive posted
waits for a ready-to-receive notice from the other side (one more round trip of process
wake-ups: on this 2-core machine it made a 4-shard layer ~7x slower than the bare transport).
So the shard keeps a receive of `inline_tokens` tokens' worth of bytes posted at all times (gloo
accepts a message shorter than the buffer), and the router posts its receive of y when it sends.
A batch of more tokens, and every batch over NCCL (which needs exact sizes), goes as the header
alone and then the body as a second message.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe.allocator import keep_freed_memory
from moe.experts import LocalExperts, Placement, ShardBatch, assign, combine, dispatch, dispatch_whole

log = logging.getLogger(__name__)

FORWARD, SHUTDOWN = 1, 2
ROUTER, SHARD = 0, 1  # ranks in each pair group
HEADER_BYTES = 32  # [op, layer, n, inline] int64
HEAD_TAG, BODY_TAG = 0, 1  # a body sent apart from its header has its own tag (gloo matches per tag)
INLINE_TOKENS = 512  # batches up to this many tokens travel as one message (gloo)
IDLE_TIMEOUT = datetime.timedelta(days=365)  # a shard waits for work as long as it takes


@dataclass(frozen=True)
class Rendezvous:
    """Where a shard finds the router: the store, this pair's key prefix, the transport."""

    store: str  # "file:///path" (same node) or "tcp://host:port"
    prefix: str
    backend: str  # "gloo" | "nccl"
    interface_host: str = "127.0.0.1"  # address gloo binds to on the shard's side
    inline_tokens: int = INLINE_TOKENS  # the shard's standing receive, in tokens (gloo; 0: none)

    @property
    def inline(self) -> int:
        """Tokens a batch may have to travel with its header: 0 over NCCL (exact sizes only)."""
        return self.inline_tokens if self.backend == "gloo" else 0


def body_bytes(n: int, hidden: int, top_k: int, dtype: torch.dtype) -> int:
    """Bytes of a batch of n tokens after the header: routing [n, 2K] float32, x [n, H]."""
    return n * (2 * top_k * 4 + hidden * dtype.itemsize)


def encode(layer: int, x: torch.Tensor, b: ShardBatch, inline: bool, device: torch.device) -> torch.Tensor:
    """One shard's batch as bytes on `device`: header, routing [n, 2K] float32 (its expert ids,
    then their weights), x[b.token_index] [n, H]. Everything is written straight into the
    message (pinned when a GPU's tensors go out over gloo)."""
    n, (hidden, k) = b.token_index.numel(), (x.shape[1], b.expert_ids.shape[1])
    pin = x.is_cuda and device.type == "cpu"
    msg = torch.empty(HEADER_BYTES + body_bytes(n, hidden, k, x.dtype), dtype=torch.uint8,
                      device=device, pin_memory=pin)  # fmt: skip
    header = torch.tensor([FORWARD, layer, n, int(inline)], dtype=torch.long)
    if msg.is_cuda:  # one asynchronous copy from pinned memory: from pageable memory it would sync
        header = header.pin_memory()
    msg[:HEADER_BYTES].view(torch.long).copy_(header, non_blocking=True)
    split = HEADER_BYTES + n * 2 * k * 4
    route = msg[HEADER_BYTES:split].view(torch.float32).view(n, 2 * k)
    route[:, :k].copy_(b.expert_ids)
    route[:, k:].copy_(b.weights)
    xs = msg[split:].view(x.dtype).view(n, hidden)
    if x.device == device:
        torch.index_select(x, 0, b.token_index, out=xs)
    else:  # blocking: gloo reads the buffer as soon as the send is posted
        xs.copy_(x[b.token_index])
    return msg


def decode(body: torch.Tensor, n: int, hidden: int, top_k: int, dtype: torch.dtype) -> tuple:
    """The body bytes of a batch → (x [n, H], routing [n, 2K] float32), views of `body`."""
    split = n * 2 * top_k * 4
    route = body[:split].view(torch.float32).view(n, 2 * top_k)
    x = body[split : split + n * hidden * dtype.itemsize].view(dtype).view(n, hidden)
    return x, route


def open_store(url: str, is_master: bool, timeout: datetime.timedelta) -> dist.Store:
    if url.startswith("file://"):
        return dist.FileStore(url.removeprefix("file://"), -1)
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    return dist.TCPStore(host, int(port), is_master=is_master, wait_for_workers=False, timeout=timeout)


def pair_group(
    store: dist.Store, prefix: str, rank: int, backend: str, timeout: datetime.timedelta, host: str
) -> Any:
    """A two-rank process group on its own key prefix (independent of any default group).
    gloo listens on `host` only (127.0.0.1 on one node)."""
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_opts)
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def comm_device(backend: str, device: torch.device) -> torch.device:
    return device if backend == "nccl" else torch.device("cpu")


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

    def send(self, layer: int, x: torch.Tensor, b: ShardBatch) -> list:
        """Post the sends of this shard's part of a layer batch → the pending works (wait on
        them): one message when it fits the shard's standing receive."""
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

    def shutdown(self) -> None:
        header = torch.tensor([SHUTDOWN, 0, 0, 0], dtype=torch.long, device=self.device)
        self.pg.send([header.view(torch.uint8)], SHARD, HEAD_TAG).wait(self.timeout)


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids → [n] int64; bincount's size check would sync a GPU."""
    flat = ids.flatten()
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, flat, torch.ones_like(flat))


class ExpertLoad:
    """What the router saw of the experts: token assignments per (layer, expert), per-shard
    round-trip latencies (histogram counts), and over the last `window` layer batches: the
    assignments per (layer, expert), the round trip per (shard, layer), and how evenly they
    spread over the shards (mean / max tokens per shard: 1.0 is perfectly even).

    Counting stays on the ids' device (no host sync in the per-layer path); the metrics scrape,
    on another thread, copies out a snapshot under the lock."""

    def __init__(self, num_shards: int, expert_to_shard: torch.Tensor, window: int = 256):
        self.expert_to_shard = expert_to_shard  # [E] primary shard of each expert (the metric's label)
        self.num_experts = len(expert_to_shard)
        self.num_shards = num_shards
        self.tokens: dict[int, torch.Tensor] = {}  # layer -> [E] assignments
        self.buckets = [[0] * (len(LATENCY_BUCKETS_S) + 1) for _ in range(num_shards)]
        self.latency_sum = [0.0] * num_shards
        self.recent: deque[torch.Tensor] = deque(maxlen=window)  # [S] assignments per shard per batch
        self.recent_experts: deque[tuple[int, torch.Tensor]] = deque(maxlen=window)  # (layer, [E]) per batch
        self.recent_latency: deque[tuple[int, int, float]] = deque(
            maxlen=window * num_shards
        )  # (shard, layer, s)
        self.holders = [1] * self.num_experts  # shards holding each expert (2+: replicated)
        self.lock = threading.Lock()

    def count(self, layer: int, expert_ids: torch.Tensor, shard_of: torch.Tensor, num_shards: int) -> None:
        """One layer batch: its routing [T, K] and the shard computing each assignment [T, K],
        of a placement over `num_shards` shards."""
        per_expert = _counts(expert_ids, self.num_experts)  # [E]
        per_shard = _counts(shard_of, num_shards)  # [S]
        with self.lock:
            self.tokens[layer] = self.tokens[layer] + per_expert if layer in self.tokens else per_expert
            if per_shard.numel() == self.num_shards:  # else routed before the shards were resized
                self.recent.append(per_shard)
            self.recent_experts.append((layer, per_expert))

    def recent_expert_load(self) -> list[float]:
        """Assignments per expert over the recent window (all layers together)."""
        with self.lock:
            if not self.recent_experts:
                return [0.0] * self.num_experts
            return torch.stack([t for _, t in self.recent_experts]).sum(0).float().cpu().tolist()

    def resize(self, num_shards: int, expert_to_shard: torch.Tensor) -> None:
        """A new number of shards (elastic resizing): per-shard figures start over."""
        with self.lock:
            self.num_shards = num_shards
            self.expert_to_shard = expert_to_shard
            self.buckets = [[0] * (len(LATENCY_BUCKETS_S) + 1) for _ in range(num_shards)]
            self.latency_sum = [0.0] * num_shards
        self.reset_window()

    def reset_window(self) -> None:
        with self.lock:
            self.recent.clear()
            self.recent_experts.clear()
            self.recent_latency.clear()

    def latency(self, shard: int, layer: int, seconds: float) -> None:
        i = next((j for j, b in enumerate(LATENCY_BUCKETS_S) if seconds <= b), len(LATENCY_BUCKETS_S))
        with self.lock:
            if shard >= self.num_shards:  # a batch posted before the shards were resized
                return
            self.buckets[shard][i] += 1
            self.latency_sum[shard] += seconds
            self.recent_latency.append((shard, layer, seconds))

    def snapshot(self) -> dict[str, Any]:
        with self.lock:  # copies only: the engine's per-layer count() waits on this lock
            tokens, shard_batches = dict(self.tokens), list(self.recent)
            expert_batches, latencies = list(self.recent_experts), list(self.recent_latency)
            counts, sums = [list(b) for b in self.buckets], list(self.latency_sum)
            num_shards = self.num_shards
        recent = torch.stack(shard_batches).sum(0).float().cpu() if shard_batches else None
        by_layer: dict[int, list[torch.Tensor]] = {}
        for layer, t in expert_batches:
            by_layer.setdefault(layer, []).append(t)
        round_trips: dict[tuple[int, int], list[float]] = {}
        for shard, layer, seconds in latencies:
            round_trips.setdefault((shard, layer), []).append(seconds)
        balanced = float(recent.mean() / recent.max()) if recent is not None and recent.max() > 0 else 1.0
        return {
            "expert_tokens": {layer: t.tolist() for layer, t in sorted(tokens.items())},
            "expert_to_shard": self.expert_to_shard.tolist(),
            "dispatch_latency_buckets": LATENCY_BUCKETS_S,
            "dispatch_latency_counts": counts,
            "dispatch_latency_sum": sums,
            "balancedness": balanced,
            "expert_holders": list(self.holders),
            "recent_expert_tokens": {
                layer: torch.stack(ts).sum(0).tolist() for layer, ts in sorted(by_layer.items())
            },
            "recent_dispatch_seconds": [  # per shard, per layer: mean round trip over the window
                {layer: sum(v) / len(v) for (k, layer), v in sorted(round_trips.items()) if k == shard}
                for shard in range(num_shards)
            ],
        }


class RemoteExperts:
    """An ExpertBackend whose experts live in other processes, reached over ShardLinks.

    Experts hold no per-request state, so a shard that dies costs no request: when a layer's
    exchange with shard k fails (its process is gone: the connection closes; or it stops
    answering within the timeout), `reconnect(k)` is called to get a link to its replacement
    (Ray restarts the replica; the router hands it a fresh rendezvous) and that shard's part
    of the layer is sent again. The step waits meanwhile; its outputs do not change.
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
        self.calls = 0
        self.seconds = 0.0  # time in submit + wait: dispatch, waiting for the shards, combine
        self.recoveries = 0
        self.load = ExpertLoad(len(links), self.placement.primary)

    def set_placement(self, placement: Placement, links: list[ShardLink] | None = None) -> None:
        """Route by a new placement from the next layer on (each layer reads it once); with
        `links`, over a new set of shards (elastic resizing)."""
        placement = placement.to(self.device)
        if links is not None and len(links) != len(self.links):
            self.load.resize(len(links), placement.primary)
        self.routing = (placement, list(links) if links is not None else self.links)
        self.load.holders = [len(s) for s in placement.expert_shards]

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

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Any:
        """Post the sends to, and the receives from, every shard that has tokens; don't wait."""
        start = time.perf_counter()
        placement, links = self.routing
        shard_of = assign(expert_ids, placement)  # [T, K]
        split = dispatch_whole if self.whole_batch else dispatch
        batches = split(expert_ids, weights, placement, shard_of)
        self.load.count(layer, expert_ids, shard_of, placement.num_shards)
        pending = []
        for k, b in enumerate(batches):
            n = b.token_index.numel()
            if n == 0:
                continue
            y = torch.empty(n, self.hidden_size, dtype=x.dtype, device=links[k].device)  # [n, H]
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
                        # NCCL: wait() with no timeout orders the stream and returns (with one, it
                        # blocks the host, polling every millisecond); its process group's own
                        # timeout catches a stuck shard. gloo: the link's timeout.
                        if link.rendezvous.backend == "nccl":
                            w.wait()
                        else:
                            w.wait(link.timeout)
                    break
                except RuntimeError as e:  # gloo/NCCL: peer gone, or no answer within the timeout
                    if self.reconnect is None or attempt == self.max_retries:
                        raise
                    links = self.links
                    if k < len(links) and links[k] is link:  # not yet replaced (by another micro-batch)
                        log.warning("expert shard %d failed at layer %d (%s); reconnecting", k, layer, e)
                        links[k] = self.reconnect(k)
                        self.recoveries += 1
                    link, works = self._exchange(links[k] if k < len(links) else link, layer, x, b, y)
            self.load.latency(k, layer, time.perf_counter() - posted)
            parts.append((b.token_index, y.to(x.device, non_blocking=True)))
        out = combine(x.shape, x.dtype, parts)
        self.calls += 1
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


class ShardServer:
    """The shard's end: connects to the router, then answers layer batches until told to stop."""

    def __init__(
        self,
        experts: LocalExperts,
        rendezvous: Rendezvous,
        connect_timeout: datetime.timedelta,
        num_threads: int | None = None,
    ):
        keep_freed_memory()  # this process's malloc keeps the layer batches' buffers (moe.allocator)
        self.experts = experts
        self.num_threads = num_threads
        self.rendezvous = rendezvous
        self.connect_timeout = connect_timeout
        self.device = experts.device
        self.comm = comm_device(rendezvous.backend, self.device)
        self.batches_served = 0
        self.compute_seconds = 0.0  # expert compute, for the shard's own figures
        self.error: BaseException | None = None
        self.router_gone = False  # the router closed the connection: it will connect anew
        self.thread: threading.Thread | None = None

    def connect(self) -> None:
        """Blocks until the router's end of the pair group is up."""
        r = self.rendezvous
        self.store = open_store(r.store, is_master=False, timeout=self.connect_timeout)
        self.pg = pair_group(self.store, r.prefix, SHARD, r.backend, IDLE_TIMEOUT, r.interface_host)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name="expert-shard-data-plane", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _serve(self) -> None:
        if self.num_threads:  # OpenMP's thread count is per calling thread: set it in this one
            torch.set_num_threads(self.num_threads)
        hidden, k = self.experts.cfg.hidden_size, self.experts.cfg.num_experts_per_tok
        dtype = self.experts.dtype
        size = HEADER_BYTES + body_bytes(self.rendezvous.inline, hidden, k, dtype)
        pin = self.device.type == "cuda" and self.comm.type == "cpu"
        # two standing receive buffers: one is read while the next batch arrives in the other.
        # NCCL runs a communicator's operations in order on one stream, so there the next
        # receive is posted only after the answer is sent (else the answer would wait on it).
        # inline 0 (NCCL, or gloo told to keep no standing receive) keeps that discipline.
        prepost = self.rendezvous.inline > 0
        bufs = [torch.empty(size, dtype=torch.uint8, device=self.comm, pin_memory=pin) for _ in range(2)]
        work, cur = self.pg.recv([bufs[0]], ROUTER, HEAD_TAG), 0
        try:
            while True:
                work.wait()
                buf = bufs[cur]
                op, layer, n, inline = buf[:HEADER_BYTES].view(torch.long).tolist()
                if op == SHUTDOWN:  # the router said goodbye; a new one may connect later
                    self.router_gone = True
                    return
                if inline:
                    body = buf[HEADER_BYTES:]
                else:  # too big for the standing buffer: the body follows on its own
                    body = torch.empty(body_bytes(n, hidden, k, dtype), dtype=torch.uint8, device=self.comm)
                    self.pg.recv([body], ROUTER, BODY_TAG).wait()
                cur = 1 - cur
                if prepost:  # before computing this batch, so the next one finds it posted
                    work = self.pg.recv([bufs[cur]], ROUTER, HEAD_TAG)
                x, route = decode(body, n, hidden, k, dtype)
                start = time.perf_counter()
                x, route = x.to(self.device), route.to(self.device)
                with torch.inference_mode():
                    y = self.experts.forward(layer, x, route[:, :k].long(), route[:, k:])
                self.compute_seconds += time.perf_counter() - start
                self.pg.send([y.to(self.comm)], ROUTER, 0).wait()
                if not prepost:
                    work = self.pg.recv([bufs[cur]], ROUTER, HEAD_TAG)
                self.batches_served += 1
        except BaseException as e:
            self.error = e
            self.router_gone = "Connection closed by peer" in str(e)  # router restarted or shut down
            (log.info if self.router_gone else log.error)("expert shard data plane stopped: %s", e)
