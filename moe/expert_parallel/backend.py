"""Expert backends: where the engine's MoE layers send their tokens.

The dense model calls `backend.submit(layer, x, expert_ids, weights)` at every MoE layer with a
(micro-)batch of the step, and later `backend.wait(handle)` for the output. `InProcessExperts`
holds all experts here, optionally split into N in-process "shards" that go through the same dispatch / combine as remote shards do —
the expert-parallel invariant (any split gives the same output) is tested on it. The cluster's
remote backend (moe.expert_parallel.remote.RemoteExperts) implements the same protocol.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from moe.checkpoint.quantization import QuantizationConfig
from moe.checkpoint.reader import CheckpointReader
from moe.config import ModelConfig
from moe.expert_parallel.placement import Placement, combine, dispatch, partition_experts
from moe.layers.experts import LocalExperts


class ExpertBackend(Protocol):
    """submit starts a layer's MoE on a batch; wait returns its output [T, H]. A backend whose
    experts are remote computes in between, so the caller can do other work meanwhile."""

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> Any:
        """x [T, H], expert_ids [T, K], weights [T, K] → a handle for wait."""
        ...

    def wait(self, handle: Any) -> torch.Tensor: ...


class InProcessExperts:
    """All experts in this process, split over `num_shards` groups with the cluster's dispatch."""

    def __init__(self, shards: list[LocalExperts], num_experts: int):
        """Shard s holds shards[s].expert_ids; an expert held by several is a replicated one. No
        shards: a dense model (nothing is ever submitted)."""
        self.shards = shards
        groups = [shard.expert_ids for shard in shards]
        self.placement = Placement.from_groups(groups, num_experts).to(shards[0].device) if shards else None

    @classmethod
    def from_checkpoint(
        cls,
        reader: CheckpointReader,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        num_shards: int = 1,
        quant: QuantizationConfig | None = None,
        gemm: str = "torch",
    ) -> InProcessExperts:
        if not cfg.is_moe:
            return cls([], 0)
        groups = partition_experts(cfg.num_local_experts, num_shards)
        shards = [LocalExperts.from_checkpoint(reader, cfg, g, dtype, device, quant, gemm) for g in groups]
        return cls(shards, cfg.num_local_experts)

    def submit(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.forward(layer, x, expert_ids, weights)  # computed right away: nothing to overlap

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle

    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        if len(self.shards) == 1:
            return self.shards[0].forward(layer, x, expert_ids, weights)
        assert self.placement is not None
        parts = []  # each shard's part of the weighted sum, float32, added in float32 as remote ones are
        for shard, b in zip(self.shards, dispatch(expert_ids, weights, self.placement), strict=True):
            if b.token_index.numel():
                parts.append((b.token_index, shard.partial(layer, x[b.token_index], b.expert_ids, b.weights)))
        return combine(x.shape, x.dtype, parts)
