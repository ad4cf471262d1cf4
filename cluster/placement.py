"""Placement: which experts live on which shard, and what each deployment asks of Ray.

Experts are split contiguously and as evenly as possible (8 experts on 3 shards: 3/3/2).
With GPUs in the cluster every shard and the router ask for one GPU each (Ray sets
CUDA_VISIBLE_DEVICES, so each lands on its own device); without, they ask for none and a CPU
share that lets the whole app fit a small machine. torch's intra-op threads are split between
the processes sharing a node's cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cluster.config import RaymixSettings
from moe.config import MixtralConfig
from moe.experts import partition_experts


@dataclass(frozen=True)
class Placement:
    expert_groups: list[list[int]]  # shard k holds expert_groups[k] of every layer
    use_gpus: bool
    shard_options: dict[str, Any]
    router_options: dict[str, Any]
    torch_threads: int


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0


def plan(settings: RaymixSettings, cfg: MixtralConfig, gpus: float) -> Placement:
    if settings.expert_shards > cfg.num_local_experts:
        raise ValueError(
            f"expert_shards={settings.expert_shards} but the model has only {cfg.num_local_experts} experts per layer"
        )
    groups = partition_experts(cfg.num_local_experts, settings.expert_shards)
    use_gpus = gpus > 0
    gpu = {"num_gpus": 1} if use_gpus else {}
    router_gpus = settings.router_gpus if settings.router_gpus is not None else (1 if use_gpus else 0)
    processes = settings.expert_shards + 1
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // processes)
    return Placement(
        expert_groups=groups,
        use_gpus=use_gpus,
        shard_options={"num_cpus": settings.shard_cpus, **gpu},
        router_options={"num_cpus": settings.router_cpus, "num_gpus": router_gpus},
        torch_threads=threads,
    )
