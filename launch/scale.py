"""Elastic resizing of a running raymix: `raymix scale --expert-shards N`.

The app's own shards stay; shards beyond them are one small Serve application each
(`raymix-shard<k>`, an ExpertShard deployment holding nothing yet). Growing starts those, then
asks the router to `resize`: it connects their data plane, splits the experts anew and moves
them while serving (load, switch routing, drain, drop). Shrinking asks the router first, then
deletes the applications no longer used (the app's own shards below N are left holding
nothing). No request is dropped either way.
"""

from __future__ import annotations

from ray import serve

from cluster.config import RaymixSettings
from cluster.messages import APP_NAME, EXPERT_SHARD, ROUTER, ResizeResult, extra_shard_app
from cluster.placement import cluster_gpus, deployment_plan
from deployments.app import shard_deployment
from moe.config import ModelConfig


def scale(settings: RaymixSettings, num_shards: int) -> ResizeResult:
    """Resize the running app (this process is connected to its Ray cluster)."""
    router = serve.get_deployment_handle(ROUTER, app_name=APP_NAME)
    stats = router.stats.remote().result()
    base, current = stats.base_shards, stats.expert_shards
    cfg = ModelConfig.from_pretrained(settings.model_dir())
    p = deployment_plan(
        settings.model_copy(update={"expert_shards": max(num_shards, 1)}), cfg, cluster_gpus()
    )
    running = set(serve.status().applications)
    for k in range(base, num_shards):
        if extra_shard_app(k) not in running:
            app = shard_deployment(settings, EXPERT_SHARD, p.shard_options).bind(
                settings, k, [], p.shard_threads
            )
            serve.run(app, name=extra_shard_app(k), route_prefix=None)
    result = router.resize.remote(num_shards, [extra_shard_app(k) for k in range(base, num_shards)]).result()
    for k in range(max(num_shards, base), current):
        serve.delete(extra_shard_app(k))
    return result
