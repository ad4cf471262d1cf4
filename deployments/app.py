"""`build_app`: the raymix Serve application from one settings object.

Importable as `deployments.app:build_app`, so the same app starts from `raymix serve`, from
Python (`serve.run(build_app({...}))`) and from a KubeRay serveConfigV2 (`import_path` with
`args`). The graph: Ingress → Router, Router1..M-1 → ExpertShard0..N-1 (one deployment per
router, with its own KV cache and batch, and per shard, since each holds different experts;
every router reaches every shard; router 0 owns the placement and knows the others).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import RaymixSettings
from cluster.messages import INGRESS, router_deployment_name, shard_deployment_name
from cluster.placement import cluster_gpus, deployment_plan, pin, reserve_nodes, threads_per_process
from deployments.ingress import Ingress
from deployments.router import Router
from deployments.shard import ExpertShard
from moe.checkpoint.reader import open_checkpoint

# how often a draining replica checks for requests still running (Serve's default 2 s, once per
# deployment in the shutdown chain ingress -> router -> shards: ~6 s of an idle shutdown)
DRAIN_POLL_S = 0.2


def shard_deployment(s: RaymixSettings, name: str, options: dict[str, Any]) -> Any:
    """The Serve deployment of one expert shard (one replica: each shard holds its own experts)."""
    return serve.deployment(
        name=name,
        num_replicas=1,
        ray_actor_options=options,
        max_ongoing_requests=16,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=s.drain_timeout_s + 15,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    )(ExpertShard)


def build_app(args: dict[str, Any] | RaymixSettings | None = None) -> Application:
    s = args if isinstance(args, RaymixSettings) else RaymixSettings(**(args or {}))
    cfg, _, _ = open_checkpoint(s.model_dir(), s.quantization)  # what cannot be served is refused here
    p = deployment_plan(s, cfg, cluster_gpus())
    shard_nodes: list[str | None] = [None] * len(p.expert_groups)
    router_node, router_nodes = None, []
    if s.placement_strategy != "none":
        shard_bundle = {"GPU": p.shard_gpus} if p.use_gpus else {"CPU": max(s.shard_cpus, 0.001)}
        if p.expert_groups:
            shard_nodes = list(reserve_nodes([shard_bundle] * len(p.expert_groups), s.placement_strategy))
        router_bundle = {"GPU": float(p.router_options["num_gpus"])} if p.router_options["num_gpus"] else {}
        router_nodes = reserve_nodes(
            [router_bundle or {"CPU": max(s.router_cpus, 0.001)}] * s.routers, "PACK"
        )
        router_node = router_nodes[0]
    threads = [p.shard_threads] * len(shard_nodes)
    if s.torch_threads is None and len(set(shard_nodes)) > 1:  # over several nodes: per node's cores
        threads = threads_per_process(shard_nodes, router_node, p.shard_threads, with_router=bool(s.overlap))
    shards = [
        shard_deployment(s, shard_deployment_name(k), pin(p.shard_options, shard_nodes[k])).bind(
            s, k, group, threads[k]
        )
        for k, group in enumerate(p.expert_groups)
    ]

    def router(i: int, followers: list[Any]) -> Any:
        return serve.deployment(
            name=router_deployment_name(i),
            num_replicas=1,
            ray_actor_options=pin(p.router_options, router_nodes[i] if router_nodes else None),
            max_ongoing_requests=100_000,
            health_check_period_s=5,
            # its ongoing requests are the ingress replicas' streams: it drains as long as they do
            graceful_shutdown_timeout_s=s.drain_timeout_s + 5,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        )(Router).bind(
            s,
            shards,
            p.expert_groups,
            p.router_threads,
            float(p.router_options["num_gpus"] or 1.0),
            i,
            followers,
        )

    others = [router(i, []) for i in range(1, s.routers)]
    routers = [router(0, others), *others]  # router 0 owns the placement: it knows the others
    scaling: dict[str, Any] = (  # each replica tokenizes, detokenizes and streams its requests
        {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": s.max_ingress_replicas,
                "target_ongoing_requests": 128,
            }
        }
        if s.max_ingress_replicas > 1
        else {"num_replicas": 1}
    )
    return serve.deployment(
        name=INGRESS,
        **scaling,
        ray_actor_options=pin({"num_cpus": 0}, router_node),
        max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=s.drain_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
    )(Ingress).bind(s, routers)
