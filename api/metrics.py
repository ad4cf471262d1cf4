"""The serving metrics: one table of specs, read by both exporters.

Names are vLLM's under a `raymix:` prefix on the ingress's `/metrics` (Prometheus text, one
registry per ingress replica, so replicas and test apps never collide), and `raymix_` through
Ray's metrics agent (deployments.ray_metrics; Ray prefixes `ray_` and takes no `:`), which is
what a cluster-wide Prometheus scrapes. The ingress observes the per-request series; the
engine's gauges, the prefix-cache counters and the expert-parallel series (tokens per expert
per layer, per-shard dispatch latency, shard balancedness) are read from the router at scrape
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from cluster.messages import ExpertLoadSnapshot, RouterStats

disable_created_metrics()  # no *_created series: they only add noise to dashboards

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # `raymix:<name>` on /metrics, `raymix_<name>` through Ray
    kind: Literal["counter", "histogram", "gauge"]
    doc: str
    labels: tuple[str, ...] = ()


# observed by the ingress, per request and per output
REQUEST_METRICS = (
    MetricSpec("prompt_tokens", "counter", "Prompt tokens processed"),
    MetricSpec("generation_tokens", "counter", "Tokens generated"),
    MetricSpec("request_success", "counter", "Finished requests by finish reason", ("finished_reason",)),
    MetricSpec("request_errors", "counter", "Requests answered with an error, by HTTP status", ("status",)),
    MetricSpec("time_to_first_token_seconds", "histogram", "Time to first token"),
    MetricSpec("e2e_request_latency_seconds", "histogram", "End-to-end request latency"),
    MetricSpec("inter_token_latency_seconds", "histogram", "Time between output tokens"),
    MetricSpec("request_queue_time_seconds", "histogram", "Time from arrival to first scheduled"),
)
# each router's engine state, fields of moe.engine.llm_engine.EngineStats
ENGINE_GAUGES = (
    MetricSpec("num_requests_running", "gauge", "Sequences in the running batch", ("router",)),
    MetricSpec("num_requests_waiting", "gauge", "Sequences waiting to be scheduled", ("router",)),
    MetricSpec("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1)", ("router",)),
)
SHARD_RECOVERIES = MetricSpec(
    "shard_recoveries", "counter", "Expert shards a router reconnected to after a failure", ("router",)
)


class MetricsMirror(Protocol):
    """A second exporter of the same series (Ray's metrics agent)."""

    def inc(self, name: str, value: float, labels: dict[str, str] | None = None) -> None: ...

    def observe(self, name: str, value: float) -> None: ...


PER_EXPERT_LIMIT = 4096  # expert_tokens series a router exports at most with expert_metrics "auto"


class ServingMetrics:
    def __init__(self, mirror: MetricsMirror | None = None, expert_metrics: str = "auto") -> None:
        self.mirror = mirror
        self.expert_metrics = expert_metrics  # "expert", "shard" or "auto" (PER_EXPERT_LIMIT)
        self.registry = r = CollectorRegistry()
        self.series: dict[str, Any] = {}
        for spec in (*REQUEST_METRICS, *ENGINE_GAUGES, SHARD_RECOVERIES):
            name = f"raymix:{spec.name}"
            if spec.kind == "counter":
                self.series[spec.name] = Counter(name, spec.doc, spec.labels, registry=r)
            elif spec.kind == "gauge":
                self.series[spec.name] = Gauge(name, spec.doc, spec.labels, registry=r)
            else:
                self.series[spec.name] = Histogram(name, spec.doc, buckets=LATENCY_BUCKETS, registry=r)
        self._recoveries_seen: dict[int, int] = {}
        self.loads: list[ExpertLoadSnapshot] = []
        self.stats: list[RouterStats] = []
        self.info: dict[str, str] = {}
        r.register(ExpertLoadCollector(self))
        r.register(PrefixCacheCollector(self))
        r.register(ServingInfoCollector(self))

    def _inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        series = self.series[name]
        (series.labels(**labels) if labels else series).inc(value)
        if self.mirror is not None and value:
            self.mirror.inc(name, value, labels or None)

    def _observe(self, name: str, value: float) -> None:
        self.series[name].observe(value)
        if self.mirror is not None:
            self.mirror.observe(name, value)

    def observe_first_token(self, seconds: float) -> None:
        self._observe("time_to_first_token_seconds", seconds)

    def count_error(self, status: int) -> None:
        self._inc("request_errors", status=str(status))

    def observe_request(
        self, prompt_tokens: int, generation_tokens: int, seconds: float, reasons: list[str | None]
    ) -> None:
        self._inc("prompt_tokens", prompt_tokens)
        self._inc("generation_tokens", generation_tokens)
        self._observe("e2e_request_latency_seconds", seconds)
        for reason in reasons:
            if reason is not None:
                self._inc("request_success", finished_reason=reason)

    def observe_output(self, gap_seconds: float | None, new_tokens: int, queue_time: float | None) -> None:
        """One output of a request: `gap_seconds` since its previous output (None for the first),
        spread over the tokens it carries, so every token after a request's first is counted
        once; the queue time comes with the first output."""
        if gap_seconds is None:  # the first output: tokens after its first arrived with it
            gaps = [0.0] * max(0, new_tokens - 1)
        else:
            gaps = [gap_seconds / new_tokens] * new_tokens
        for gap in gaps:
            self._observe("inter_token_latency_seconds", gap)
        if queue_time is not None:
            self._observe("request_queue_time_seconds", queue_time)

    def render(
        self,
        stats: list[RouterStats],
        loads: list[ExpertLoadSnapshot] | None = None,
        info: dict[str, str] | None = None,
    ) -> tuple[bytes, str]:
        """The exposition text, with each router's `stats` and expert `loads` as of now
        (labelled `router`), and `info` (model name, revision) as raymix:model_info."""
        self.info = info or {}
        self.loads = loads or []
        self.stats = stats
        for spec in ENGINE_GAUGES:  # a router that did not answer has no value, not its last one
            self.series[spec.name].clear()
        for s in stats:
            router = str(s.router)
            for spec in ENGINE_GAUGES:
                self.series[spec.name].labels(router=router).set(getattr(s.engine, spec.name))
            seen = self._recoveries_seen.get(s.router, 0)
            if s.shard_recoveries > seen:  # the router's count is cumulative; a new router starts at 0
                self.series[SHARD_RECOVERIES.name].labels(router=router).inc(s.shard_recoveries - seen)
            self._recoveries_seen[s.router] = s.shard_recoveries
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ExpertLoadCollector:
    """Expert-parallel metrics from the router's counters, at scrape time. Cardinality is bounded:
    layers x experts series of expert_tokens per router (256 for Mixtral 8x7B, 448 for 8x22B), or,
    where that is too many (Qwen3-235B: 94 x 128 = 12,032) or `expert_metrics` says so, one
    series per shard (shard_expert_tokens: its experts' assignments, every layer together); one
    latency histogram per shard, one gauge."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        loads = self.metrics.loads
        if not loads:
            return
        tokens = CounterMetricFamily(
            "raymix:expert_tokens",
            "Token assignments routed to each expert, per layer",
            labels=["layer", "expert", "shard", "router"],
        )
        latency = HistogramMetricFamily(
            "raymix:dispatch_latency_seconds",
            "Per-layer round trip to each expert shard",
            labels=["shard", "router"],
        )
        balance = GaugeMetricFamily(
            "raymix:shard_balancedness",
            "Mean / max tokens per expert shard over recent layer batches (1 = even)",
            labels=["router"],
        )
        by_shard = CounterMetricFamily(
            "raymix:shard_expert_tokens",
            "Token assignments routed to each shard's experts, every layer together",
            labels=["shard", "router"],
        )
        mode = self.metrics.expert_metrics
        for load in loads:
            router = str(load.router)
            series = len(load.expert_tokens) * len(load.expert_to_shard)
            if mode == "expert" or (mode == "auto" and series <= PER_EXPERT_LIMIT):
                for layer, counts in load.expert_tokens.items():
                    for expert, n in enumerate(counts):
                        holder = str(load.expert_to_shard[expert])
                        tokens.add_metric([str(layer), str(expert), holder, router], n)
            else:
                totals: dict[int, int] = {}
                for per_expert in load.expert_tokens.values():
                    for expert, n in enumerate(per_expert):
                        totals[load.expert_to_shard[expert]] = totals.get(load.expert_to_shard[expert], 0) + n
                for k, total in sorted(totals.items()):
                    by_shard.add_metric([str(k), router], total)
            for shard, counts in enumerate(load.dispatch_latency_counts):
                cumulative, total = [], 0
                for bound, c in zip([*load.dispatch_latency_buckets, float("inf")], counts, strict=True):
                    total += c
                    cumulative.append(("+Inf" if bound == float("inf") else str(bound), total))
                latency.add_metric(
                    [str(shard), router], cumulative, sum_value=load.dispatch_latency_sum[shard]
                )
            balance.add_metric([router], load.balancedness)
        yield tokens
        yield by_shard
        yield latency
        yield balance
        holders = GaugeMetricFamily(
            "raymix:expert_holders",
            "Shards holding each expert (2 or more: replicated by EPLB)",
            labels=["expert"],
        )
        for expert, n in enumerate(loads[0].expert_holders):  # one placement: every router's is the same
            holders.add_metric([str(expert)], n)
        yield holders


class PrefixCacheCollector:
    """The router's cumulative prefix-cache counters (in prompt tokens, as vLLM counts them):
    hit rate = rate(hits) / rate(queries)."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.stats
        if not stats:
            return
        queries = CounterMetricFamily(
            "raymix:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=["router"]
        )
        hits = CounterMetricFamily(
            "raymix:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not recomputed)",
            labels=["router"],
        )
        for s in stats:
            queries.add_metric([str(s.router)], s.engine.prefix_cache_queries)
            hits.add_metric([str(s.router)], s.engine.prefix_cache_hits)
        yield queries
        yield hits


class ServingInfoCollector:
    """What is served and what it holds: raymix:model_info{model_name, revision} 1 (the
    checkpoint's content hash, so a dashboard shows which weights answered), and on GPUs each
    deployment's GPU memory (the router's stats carry `gpu_memory`: {deployment: {used, total}})."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        if self.metrics.info:
            info = InfoMetricFamily("raymix:model", "The served model and its checkpoint revision")
            info.add_metric([], self.metrics.info)
            yield info
        memory = {k: m for s in self.metrics.stats for k, m in s.gpu_memory.items()}
        if memory:
            for key, doc in (("used", "GPU memory held by the process"), ("total", "The GPU's memory")):
                family = GaugeMetricFamily(f"raymix:gpu_memory_{key}_bytes", doc, labels=["deployment"])
                for deployment, m in sorted(memory.items()):
                    family.add_metric([deployment], m[key])
                yield family
