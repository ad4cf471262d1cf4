"""ExpertLoad: what a router saw of the experts (token assignments, round trips, balance).

It feeds EPLB (moe.expert_parallel.eplb), the per-expert metrics and the web page's expert view.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)


def _counts(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids → [n] int64; bincount's size check would sync a GPU."""
    flat = ids.flatten()
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, flat, torch.ones_like(flat))


@dataclass(frozen=True)
class ExpertLoadSnapshot:
    """A copy of a router's ExpertLoad: what /metrics, the web page and EPLB read."""

    expert_tokens: dict[int, list[int]]  # layer -> [E] token assignments since start
    expert_to_shard: list[int]  # [E] primary shard of each expert
    dispatch_latency_buckets: tuple[float, ...]  # upper bounds, seconds
    dispatch_latency_counts: list[list[int]]  # [shard][bucket, then +Inf] round trips
    dispatch_latency_sum: list[float]  # [shard] seconds
    balancedness: float  # mean / max tokens per shard over the recent window (1 = even)
    expert_holders: list[int]  # [E] shards holding each expert (2+: replicated)
    recent_expert_tokens: dict[int, list[int]]  # layer -> [E] over the recent window
    recent_dispatch_seconds: list[dict[int, float]]  # [shard] layer -> mean round trip, recent window
    router: int = 0  # whose (with several routers)


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

    def snapshot(self) -> ExpertLoadSnapshot:
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
        return ExpertLoadSnapshot(
            expert_tokens={layer: t.tolist() for layer, t in sorted(tokens.items())},
            expert_to_shard=self.expert_to_shard.tolist(),
            dispatch_latency_buckets=LATENCY_BUCKETS_S,
            dispatch_latency_counts=counts,
            dispatch_latency_sum=sums,
            balancedness=balanced,
            expert_holders=list(self.holders),
            recent_expert_tokens={
                layer: torch.stack(ts).sum(0).tolist() for layer, ts in sorted(by_layer.items())
            },
            recent_dispatch_seconds=[  # per shard, per layer: mean round trip over the window
                {layer: sum(v) / len(v) for (k, layer), v in sorted(round_trips.items()) if k == shard}
                for shard in range(num_shards)
            ],
        )
