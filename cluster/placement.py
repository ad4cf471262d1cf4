"""Placement: which experts live on which shard, and what each deployment asks of Ray.

Experts are split contiguously and as evenly as possible (8 experts on 3 shards: 3/3/2).
With GPUs in the cluster every shard and the router ask for one GPU each (Ray sets
CUDA_VISIBLE_DEVICES, so each lands on its own device); with fewer GPUs than that, they share
them: each asks for the fraction that packs them evenly (a one-GPU workstation: router and two
shards at 0.3333 each), and the router talks to a shard on its own GPU over gloo instead of
NCCL (deployments/shard_pool.py). Without GPUs they ask for none and a CPU share that lets the
whole app fit a small machine. torch's intra-op threads are split between the processes sharing
a node's cores.

Over several nodes (`placement_strategy`), Ray's own placement-group scheduler decides: one
bundle per shard is reserved with the strategy (SPREAD by default: shards over as many nodes as
there are), the node of each bundle is read, and each shard deployment is asked for that node;
the router and the ingress go together on one node (the ingress forwards every request and
receives every output of the router).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from cluster.config import RaymixSettings
from moe.config import ModelConfig
from moe.expert_parallel.placement import partition_experts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentPlan:
    expert_groups: list[list[int]]  # shard k holds expert_groups[k] of every layer
    use_gpus: bool
    shard_options: dict[str, Any]
    router_options: dict[str, Any]
    router_threads: int  # torch intra-op threads of the router
    shard_threads: int  # ... of each expert shard

    @property
    def shard_gpus(self) -> float:
        return float(self.shard_options.get("num_gpus", 0))


def gpu_share(gpus: float, processes: int) -> float:
    """GPUs each of `processes` GPU-using processes asks for: 1 when the cluster has enough,
    else the fraction that packs them evenly onto its GPUs (Ray places fractions up to 1 per
    device, in steps of 1e-4): 3 processes on 1 GPU get 0.3333 each; 5 on 2 get 0.3333, three
    on one device and two on the other."""
    if processes <= 0 or gpus <= 0:
        return 0.0
    if gpus >= processes:
        return 1.0
    whole = int(gpus)
    if whole == 0:  # less than one GPU in all: split what there is
        return math.floor(gpus / processes * 1e4) / 1e4
    per_gpu = -(-processes // whole)  # processes per device, rounded up
    return math.floor(1e4 / per_gpu) / 1e4


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0


NODE_LABEL = "ray.io/node-id"  # every Ray node carries it


def pin(options: dict[str, Any], node_id: str | None) -> dict[str, Any]:
    """Actor options preferring `node_id`: a label selector with a fallback to any node, so a
    replica replaced after its node is lost still finds a home."""
    if node_id is None:
        return options
    return {**options, "label_selector": {NODE_LABEL: node_id}, "fallback_strategy": [{"label_selector": {}}]}


def reserve_nodes(bundles: list[dict[str, float]], strategy: str, timeout_s: float = 120.0) -> list[str]:
    """Where Ray would put these bundles under `strategy` (PACK, SPREAD, STRICT_PACK,
    STRICT_SPREAD): a placement group is reserved, each bundle's node read, and the group
    released. → one node id per bundle."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    pg = placement_group(bundles, strategy=strategy)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"the cluster cannot place {len(bundles)} expert shards with strategy {strategy} "
                f"(bundles {bundles[0]} each): not enough nodes or resources"
            )
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        return [nodes[i] for i in range(len(bundles))]
    finally:
        remove_placement_group(pg)


def threads_per_process(
    nodes: list[str | None], router_node: str | None, default: int, with_router: bool
) -> list[int]:
    """torch threads for the process on each of `nodes` (the shards'): the node's CPUs shared by
    the shards placed there (and the router, if it computes at the same time: `with_router`)."""
    import ray

    if not ray.is_initialized() or any(n is None for n in nodes):
        return [default] * len(nodes)
    cpus = {n["NodeID"]: n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["Alive"]}
    here = {n: nodes.count(n) + (with_router and n == router_node) for n in set(nodes)}
    return [max(1, int(cpus.get(n, default) // here[n])) for n in nodes]  # type: ignore[arg-type,index]


def expert_shards(settings: RaymixSettings, cfg: ModelConfig) -> int:
    """How many expert shards serve this model: --expert-shards (0: the experts in the router's
    process), none for a dense model (its MLP runs on the router; an explicit --expert-shards
    then gets a warning)."""
    if cfg.is_moe:
        return settings.expert_shards
    if "expert_shards" in settings.model_fields_set and settings.expert_shards:
        log.warning(
            "expert_shards=%d ignored: this model (model_type %s) is dense, it has no experts to shard; "
            "it is served whole by the router",
            settings.expert_shards,
            cfg.model_type,
        )
    return 0


def deployment_plan(settings: RaymixSettings, cfg: ModelConfig, gpus: float) -> DeploymentPlan:
    n = expert_shards(settings, cfg)
    if n > cfg.num_local_experts:
        raise ValueError(
            f"expert_shards={n} but the model has only {cfg.num_local_experts} experts per layer"
        )
    groups = partition_experts(cfg.num_local_experts, n) if n else []
    use_gpus = gpus > 0
    if settings.router_gpus is not None:  # as given; the shards share the rest
        router_gpus = settings.router_gpus
        share = gpu_share(gpus - settings.routers * router_gpus, n) if use_gpus else 0.0
    else:  # every router and every shard a GPU of its own, or an even share
        share = gpu_share(gpus, n + settings.routers)
        router_gpus = share
    gpu = {"num_gpus": share} if use_gpus else {}
    router_threads, shard_threads = cpu_threads(settings, n, os.cpu_count() or 1)
    env = omp_env(n, use_gpus)
    return DeploymentPlan(
        expert_groups=groups,
        use_gpus=use_gpus,
        shard_options={"num_cpus": settings.shard_cpus, **gpu, **env},
        router_options={"num_cpus": settings.router_cpus, "num_gpus": router_gpus, **env},
        router_threads=router_threads,
        shard_threads=shard_threads,
    )


def omp_env(shards: int, use_gpus: bool) -> dict[str, Any]:
    """The router's and shards' runtime_env when they compute on CPUs in turns: OpenMP's idle
    threads sleep at once (OMP_WAIT_POLICY=PASSIVE) instead of spinning on the cores the other
    process is computing on (measured on 2 cores, 32 streams: 1 shard 252 -> 287 tok/s, 4 shards
    214 -> 249). It must be in the environment before torch loads libgomp, hence the runtime_env;
    left out where the user set it, with GPUs, and with no shards (one process: spinning wins)."""
    if shards == 0 or use_gpus or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}


def cpu_threads(settings: RaymixSettings, shards: int, cores: int) -> tuple[int, int]:
    """torch threads of the router and of each shard on a node of `cores` cores: the cores each
    really has while it computes. Without overlap the router and the shards take turns (the
    router waits for a layer's experts, the shards for the router's next layer), so the router
    computes on every core and the shards share them; with overlap all compute at once and share
    the cores. Several routers compute at once: they share the cores. --torch-threads overrides
    both. Measured on 2 cores, 1 shard, 32 streams: 252 tok/s
    with 2 threads each against 184 with 1 each, 287 with OpenMP's idle threads passive
    (`omp_env`; docs/performance.md)."""
    if settings.torch_threads:
        return settings.torch_threads, settings.torch_threads
    routers = settings.routers  # routers compute at the same time as each other
    if settings.overlap:
        each = max(1, cores // (shards + routers))
        return each, each
    return max(1, cores // routers), max(1, cores // max(shards, 1))
