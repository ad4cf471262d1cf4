"""Prometheus metrics of the serving path, named as vLLM names them under a `raymix:` prefix.

Counters and histograms are observed by the ingress per request and per output; the engine's
gauges (running, waiting, KV-cache usage), prefix-cache counters and the expert-parallel metrics (tokens per expert per
layer, per-shard dispatch latency, shard balancedness) are read from the router at scrape time. One registry per ingress
process, so several replicas or test apps never collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

disable_created_metrics()  # no *_created series: they only add noise to dashboards

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class ServingMetrics:
    def __init__(self, ray_export: bool = False) -> None:
        """ray_export: also report through Ray's metrics agent (deployments/ray_metrics.py)."""
        self.ray: Any = None
        if ray_export:
            from deployments.ray_metrics import RequestMetrics

            self.ray = RequestMetrics()
        self.registry = r = CollectorRegistry()
        self.prompt_tokens = Counter("raymix:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("raymix:generation_tokens", "Tokens generated", registry=r)
        self.request_success = Counter(
            "raymix:request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "raymix:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "raymix:e2e_request_latency_seconds",
            "End-to-end request latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge("raymix:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("raymix:num_requests_waiting", "Sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge(
            "raymix:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", registry=r
        )
        self.itl = Histogram(
            "raymix:inter_token_latency_seconds",
            "Time between output tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "raymix:request_queue_time_seconds",
            "Time from arrival to first scheduled",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "raymix:request_errors", "Requests answered with an error, by HTTP status", ["status"], registry=r
        )
        self.recoveries = Counter(
            "raymix:shard_recoveries", "Expert shards replaced after a failure", registry=r
        )
        self._recoveries_seen = 0
        self.load: dict[str, Any] = {}
        self.engine_stats: dict[str, Any] = {}
        r.register(ExpertLoadCollector(self))
        r.register(PrefixCacheCollector(self))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        if self.ray:
            self.ray.ttft.observe(seconds)

    def count_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()
        if self.ray:
            self.ray.errors.inc(1, tags={"status": str(status)})

    def observe_request(
        self, prompt_tokens: int, generation_tokens: int, seconds: float, reasons: list
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.e2e.observe(seconds)
        for reason in reasons:
            if reason is not None:
                self.request_success.labels(finished_reason=reason).inc()
        if self.ray:
            self.ray.request(prompt_tokens, generation_tokens, seconds, reasons)

    def observe_output(self, gap_seconds: float | None, new_tokens: int, queue_time: float | None) -> None:
        """One output of a request: `gap_seconds` since its previous output (None for the first),
        spread over the tokens it carries, so every token after a request's first is counted
        once; the queue time comes with the first output."""
        if gap_seconds is None:  # the first output: tokens after its first arrived with it
            gaps = [0.0] * max(0, new_tokens - 1)
        else:
            gaps = [gap_seconds / new_tokens] * new_tokens
        for gap in gaps:
            self.itl.observe(gap)
            if self.ray:
                self.ray.itl.observe(gap)
        if queue_time is not None:
            self.queue_time.observe(queue_time)
            if self.ray:
                self.ray.queue_time.observe(queue_time)

    def render(self, engine_stats: dict[str, Any], load: dict[str, Any] | None = None) -> tuple[bytes, str]:
        self.load = load or {}
        self.engine_stats = engine_stats
        self.running.set(engine_stats.get("num_requests_running", 0))
        self.waiting.set(engine_stats.get("num_requests_waiting", 0))
        self.kv_usage.set(engine_stats.get("kv_cache_usage_perc", 0.0))
        recoveries = engine_stats.get("shard_recoveries", 0)
        if recoveries > self._recoveries_seen:  # the router's count is cumulative; a new router starts at 0
            self.recoveries.inc(recoveries - self._recoveries_seen)
        self._recoveries_seen = recoveries
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ExpertLoadCollector:
    """Expert-parallel metrics from the router's counters, at scrape time. Cardinality is bounded
    by the model: layers x experts series of expert_tokens (256 for Mixtral 8x7B, 448 for 8x22B),
    one latency histogram per shard, one gauge."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        load = self.metrics.load
        if not load:
            return
        shard_of = load["expert_to_shard"]
        tokens = CounterMetricFamily(
            "raymix:expert_tokens",
            "Token assignments routed to each expert, per layer",
            labels=["layer", "expert", "shard"],
        )
        for layer, counts in load["expert_tokens"].items():
            for expert, n in enumerate(counts):
                tokens.add_metric([str(layer), str(expert), str(shard_of[expert])], n)
        yield tokens
        latency = HistogramMetricFamily(
            "raymix:dispatch_latency_seconds", "Per-layer round trip to each expert shard", labels=["shard"]
        )
        for shard, counts in enumerate(load["dispatch_latency_counts"]):
            cumulative, total = [], 0
            for bound, c in zip([*load["dispatch_latency_buckets"], float("inf")], counts, strict=True):
                total += c
                cumulative.append(("+Inf" if bound == float("inf") else str(bound), total))
            latency.add_metric([str(shard)], cumulative, sum_value=load["dispatch_latency_sum"][shard])
        yield latency
        holders = GaugeMetricFamily(
            "raymix:expert_holders",
            "Shards holding each expert (2 or more: replicated by EPLB)",
            labels=["expert"],
        )
        for expert, n in enumerate(load.get("expert_holders", [])):
            holders.add_metric([str(expert)], n)
        yield holders
        yield GaugeMetricFamily(
            "raymix:shard_balancedness",
            "Mean / max tokens per expert shard over recent layer batches (1 = even)",
            value=load["balancedness"],
        )


class PrefixCacheCollector:
    """The router's cumulative prefix-cache counters (in prompt tokens, as vLLM counts them):
    hit rate = rate(hits) / rate(queries)."""

    def __init__(self, metrics: ServingMetrics):
        self.metrics = metrics

    def collect(self):
        stats = self.metrics.engine_stats
        if "prefix_cache_queries" not in stats:
            return
        yield CounterMetricFamily(
            "raymix:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=stats["prefix_cache_queries"],
        )
        yield CounterMetricFamily(
            "raymix:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (not recomputed)",
            value=stats["prefix_cache_hits"],
        )
