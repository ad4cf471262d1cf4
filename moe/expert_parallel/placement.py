"""Expert placement: which shards hold each expert, and a batch split between them and added back.

`Placement` says which shards hold each expert (a hot one may be replicated on several);
`assign` picks the shard computing each (token, expert) assignment; `dispatch` groups a flat
batch of tokens by the shard computing each of their experts (`dispatch_whole` sends every
shard the whole batch, for a GPU router that must not sync the host); `combine` adds the
shards' weighted outputs back, in float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


def partition_experts(num_experts: int, num_shards: int) -> list[list[int]]:
    """Contiguous, as-even-as-possible split: 8 experts on 3 shards → [0,1,2] [3,4,5] [6,7]."""
    if not 1 <= num_shards <= num_experts:
        raise ValueError(f"num_shards must be between 1 and {num_experts}, got {num_shards}")
    base, extra = divmod(num_experts, num_shards)
    out, start = [], 0
    for s in range(num_shards):
        n = base + (1 if s < extra else 0)
        out.append(list(range(start, start + n)))
        start += n
    return out


@dataclass
class ShardBatch:
    """The part of a flat batch one shard computes: its tokens and which of their experts."""

    token_index: torch.Tensor  # [n] rows of the full batch
    expert_ids: torch.Tensor  # [n, K] global ids this shard computes; -1 for the others
    weights: torch.Tensor  # [n, K] float32


class Placement:
    """Which shards hold each expert: its primary shard first, then any replicas (hot experts
    copied to spare room on other shards, see moe.expert_parallel.eplb). `table` [E, R] lists each expert's
    shards (padded with the primary), `count` [E] how many there are."""

    def __init__(self, expert_shards: list[list[int]], num_shards: int):
        if any(not s for s in expert_shards):
            raise ValueError("every expert must be held by a shard")
        self.expert_shards = [list(s) for s in expert_shards]
        self.num_shards = num_shards
        width = max(len(s) for s in expert_shards)
        self.table = torch.tensor([s + [s[0]] * (width - len(s)) for s in expert_shards], dtype=torch.long)
        self.holders = [len(s) for s in expert_shards]  # [E] how many shards hold each expert
        self.count = torch.tensor(self.holders, dtype=torch.long)
        self.primary = self.table[:, 0].clone()  # [E]
        self.replicated = width > 1

    @classmethod
    def from_groups(cls, groups: list[list[int]], num_experts: int | None = None) -> Placement:
        """Shard s holds the experts groups[s] (an expert in several groups is replicated);
        num_experts: how many there are (default: up to the highest id held)."""
        if num_experts is None:
            num_experts = max(e for g in groups for e in g) + 1
        return cls([[s for s, g in enumerate(groups) if e in g] for e in range(num_experts)], len(groups))

    def experts_on(self, shard: int) -> list[int]:
        return [e for e, shards in enumerate(self.expert_shards) if shard in shards]

    def without(self, shards: set[int]) -> Placement | None:
        """The same placement with `shards` holding nothing (they died): every expert on its
        other holders, or None when an expert would have none (only a replacement can then
        compute it)."""
        kept = [[s for s in holders if s not in shards] for holders in self.expert_shards]
        if any(not h for h in kept):
            return None
        return Placement(kept, self.num_shards)

    def to(self, device: torch.device | str) -> Placement:
        """The same placement with its tensors on `device` (this one is left as it is)."""
        moved = copy.copy(self)
        moved.table, moved.count, moved.primary = (
            self.table.to(device),
            self.count.to(device),
            self.primary.to(device),
        )
        return moved


def assign(expert_ids: torch.Tensor, placement: Placement) -> torch.Tensor:
    """expert_ids [T, K] → the shard computing each (token, expert) assignment [T, K]. With
    replicas, an expert's assignments are dealt out by token position (token t to replica
    t mod count), so a hot expert's tokens split evenly between its holders."""
    if not placement.replicated:
        return placement.primary[expert_ids]
    pos = torch.arange(expert_ids.shape[0], device=expert_ids.device)[:, None]  # [T, 1]
    return placement.table[expert_ids, pos % placement.count[expert_ids]]  # [T, K]


def dispatch(
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    placement: Placement,
    shard_of: torch.Tensor | None = None,
) -> list[ShardBatch]:
    """Group tokens by shard: a token goes to each shard computing one of its experts, once
    even when that shard computes both. The ids a shard is not to compute are sent as -1: a
    shard may hold more than it is routed (while replicas are being added or moved), and each
    assignment must still be computed exactly once.

    expert_ids [T, K], weights [T, K] (shard_of [T, K]: `assign`, if already known) → one
    ShardBatch per shard.
    """
    shard_of = assign(expert_ids, placement) if shard_of is None else shard_of
    batches = []
    for s in range(placement.num_shards):
        mine = shard_of == s  # [T, K]
        rows = mine.any(dim=-1).nonzero().squeeze(-1)  # [n_s]
        ids = torch.where(mine[rows], expert_ids[rows], -1)  # [n_s, K]
        batches.append(ShardBatch(rows, ids, weights[rows]))
    return batches


def dispatch_whole(
    expert_ids: torch.Tensor, weights: torch.Tensor, placement: Placement, shard_of: torch.Tensor
) -> list[ShardBatch]:
    """Every shard gets the whole batch, its ids -1 where another shard computes the assignment:
    more bytes than `dispatch` (S·T rows rather than about T·min(K, S)), but each size is T,
    known without reading the routing, so a GPU router posts the exchange with no host sync.

    expert_ids [T, K], weights [T, K], shard_of [T, K] (`assign`) → one ShardBatch per shard.
    """
    rows = torch.arange(expert_ids.shape[0], device=expert_ids.device)  # [T]
    return [
        ShardBatch(rows, torch.where(shard_of == s, expert_ids, -1), weights)
        for s in range(placement.num_shards)
    ]


def combine(
    hidden_shape: torch.Size, dtype: torch.dtype, parts: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Sum the shards' parts into a [T, H] tensor of `dtype`. parts: (token_index [n], part
    [n, H] float32). The sum is taken in float32 and rounded once: with top-2 routing a token's
    output is then the same bits however its two experts are split over shards."""
    out = torch.zeros(hidden_shape, dtype=torch.float32, device=parts[0][1].device if parts else "cpu")
    for rows, y in parts:
        out.index_add_(0, rows, y.float())
    return out.to(dtype)
