"""The serving metrics through Ray's own metrics export (`ray.util.metrics`), from api.metrics' specs.

On a Ray cluster every node's metrics agent serves all its processes' metrics on one port
(`--metrics-export-port`, 8080 in KubeRay's pods), which is what a cluster-wide Prometheus
scrapes. The ingress mirrors its per-request series here (a `MetricsMirror`), and the router
sets the engine's gauges once a second. Ray takes no `:` in names and prefixes its own, so
`raymix:generation_tokens_total` on `/metrics` is `ray_raymix_generation_tokens_total` here.
The per-expert series stay on `/metrics` only: they are the router's cumulative counters,
read at scrape time.
"""

from __future__ import annotations

from typing import Any

from api.metrics import ENGINE_GAUGES, LATENCY_BUCKETS, REQUEST_METRICS, MetricSpec
from moe.engine.llm_engine import EngineStats


def _ray_metric(spec: MetricSpec) -> Any:
    from ray.util.metrics import Counter, Gauge, Histogram

    name = f"raymix_{spec.name}"
    if spec.kind == "counter":
        return Counter(name, spec.doc, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return Gauge(name, spec.doc, tag_keys=spec.labels)
    return Histogram(name, spec.doc, boundaries=list(LATENCY_BUCKETS), tag_keys=spec.labels)


class RayRequestMetrics:
    """The ingress's per-request series (api.metrics.MetricsMirror)."""

    def __init__(self) -> None:
        self.series = {spec.name: _ray_metric(spec) for spec in REQUEST_METRICS}

    def inc(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self.series[name].inc(value, tags=labels)

    def observe(self, name: str, value: float) -> None:
        self.series[name].observe(value)


class RayEngineGauges:
    """A router's engine gauges, tagged with the router."""

    def __init__(self, router: int) -> None:
        self.series = {spec.name: _ray_metric(spec) for spec in ENGINE_GAUGES}
        self.tags = {"router": str(router)}

    def set(self, stats: EngineStats) -> None:
        for name, gauge in self.series.items():
            gauge.set(float(getattr(stats, name)), tags=self.tags)


class RayGpuMemory:
    """A deployment's GPU memory (moe.engine.llm_engine.gpu_memory) as raymix_gpu_memory_{used,total}_bytes,
    tagged with the deployment (and shard)."""

    def __init__(self, deployment: str) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"deployment": deployment}
        self.used = Gauge(
            "raymix_gpu_memory_used_bytes", "GPU memory held by the process", tag_keys=("deployment",)
        )
        self.total = Gauge("raymix_gpu_memory_total_bytes", "The GPU's memory", tag_keys=("deployment",))

    def set(self, memory: dict[str, int] | None) -> None:
        if memory:
            self.used.set(memory["used"], tags=self.tags)
            self.total.set(memory["total"], tags=self.tags)
