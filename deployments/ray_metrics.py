"""The serving metrics once more, through Ray's own metrics export (`ray.util.metrics`).

On a Ray cluster every node's metrics agent serves all its processes' metrics on one port
(`--metrics-export-port`, 8080 in KubeRay's pods), which is what a cluster-wide Prometheus
scrapes. The ingress mirrors its per-request counters and histograms there, and the router
sets the engine's gauges there once a second. Ray takes no `:` in names and prefixes its own,
so `raymix:generation_tokens_total` on `/metrics` is `ray_raymix_generation_tokens_total` there. The per-expert series stay on `/metrics` only: they are the router's
cumulative counters, read at scrape time.
"""

from __future__ import annotations

from typing import Any


class RequestMetrics:
    """Per-request counters and histograms of one ingress replica."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        from deployments.metrics import LATENCY_BUCKETS

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, boundaries=list(LATENCY_BUCKETS))

        self.prompt_tokens = Counter("raymix_prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = Counter("raymix_generation_tokens", "Tokens generated")
        self.request_success = Counter(
            "raymix_request_success", "Finished requests by finish reason", tag_keys=("finished_reason",)
        )
        self.errors = Counter(
            "raymix_request_errors", "Requests answered with an error", tag_keys=("status",)
        )
        self.ttft = hist("raymix_time_to_first_token_seconds", "Time to first token")
        self.e2e = hist("raymix_e2e_request_latency_seconds", "End-to-end request latency")
        self.itl = hist("raymix_inter_token_latency_seconds", "Time between output tokens")
        self.queue_time = hist("raymix_request_queue_time_seconds", "Time from arrival to first scheduled")

    def request(self, prompt_tokens: int, generation_tokens: int, seconds: float, reasons: list) -> None:
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
        self.e2e.observe(seconds)
        for reason in reasons:
            if reason is not None:
                self.request_success.inc(1, tags={"finished_reason": reason})


class EngineGauges:
    """The router's engine gauges."""

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {
            "num_requests_running": Gauge("raymix_num_requests_running", "Sequences in the running batch"),
            "num_requests_waiting": Gauge("raymix_num_requests_waiting", "Sequences waiting to be scheduled"),
            "kv_cache_usage_perc": Gauge("raymix_kv_cache_usage_perc", "Fraction of KV-cache blocks in use"),
        }

    def set(self, stats: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(float(stats.get(key, 0.0)))
