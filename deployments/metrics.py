"""Prometheus metrics of the serving path, named as vLLM names them under a `raymix:` prefix.

Counters and histograms are observed by the ingress per request; the engine's gauges (running,
waiting, KV-cache usage) are read from the router at scrape time. One registry per ingress
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

disable_created_metrics()  # no *_created series: they only add noise to dashboards

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)


class ServingMetrics:
    def __init__(self) -> None:
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

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_request(
        self, prompt_tokens: int, generation_tokens: int, seconds: float, reasons: list
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.e2e.observe(seconds)
        for reason in reasons:
            if reason is not None:
                self.request_success.labels(finished_reason=reason).inc()

    def render(self, engine_stats: dict[str, Any]) -> tuple[bytes, str]:
        self.running.set(engine_stats.get("num_requests_running", 0))
        self.waiting.set(engine_stats.get("num_requests_waiting", 0))
        self.kv_usage.set(engine_stats.get("kv_cache_usage_perc", 0.0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
