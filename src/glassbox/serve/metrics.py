"""Prometheus metrics on a private registry (one per app).

Every request ends with exactly one outcome label on ``glassbox_requests_total``:
``ok`` (finished and delivered), ``rejected`` (a 4xx before or at submission),
``disconnected`` (the client went away), ``timeout`` (--request-timeout or
--max-queue-wait), ``error`` (a server fault, before or during a stream).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from glassbox.infer.engine import RequestStream
from glassbox.serve.loading import ServedModel, engine_counters

OUTCOMES = ("ok", "rejected", "disconnected", "timeout", "error")


class Metrics:
    """The server's counters, gauges and latency histograms."""

    def __init__(self, models: dict[str, ServedModel]):
        self.registry = r = CollectorRegistry()
        lab = ["model"]
        self.queue_depth = Gauge("glassbox_queue_depth", "Requests waiting", lab, registry=r)
        self.running = Gauge("glassbox_running_sequences", "Sequences decoding", lab, registry=r)
        self.free_slots = Gauge("glassbox_free_slots", "Free KV-cache slots", lab, registry=r)
        for name, sm in models.items():
            e = sm.engine
            self.queue_depth.labels(name).set_function(lambda e=e: e.queue_depth)
            self.running.labels(name).set_function(lambda e=e: e.num_running)
            self.free_slots.labels(name).set_function(lambda e=e: engine_counters(e)["free_slots"])
        self.requests = Counter(
            "glassbox_requests", "Requests by outcome", ["model", "status"], registry=r
        )
        self.prompt_tokens = Counter("glassbox_prompt_tokens", "Prompt tokens", lab, registry=r)
        self.generation_tokens = Counter(
            "glassbox_generation_tokens", "Generated tokens", lab, registry=r
        )
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram(
            "glassbox_time_to_first_token_seconds", "Time to first token", lab,
            buckets=buckets, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "glassbox_e2e_request_latency_seconds", "Request latency", lab,
            buckets=buckets, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "glassbox_time_per_output_token_seconds", "Time per output token after the first",
            lab, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28), registry=r,
        )  # fmt: skip

    def outcome(self, model: str, status: str) -> None:
        """Count one request's outcome (one of OUTCOMES)."""
        assert status in OUTCOMES, status
        self.requests.labels(model, status).inc()

    def observe(self, model: str, stream: RequestStream, prompt_tokens: int, n_tokens: int):
        """Token counts and latencies of one finished engine request."""
        now = time.perf_counter()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(n_tokens)
        self.latency.labels(model).observe(now - stream.submitted)
        if stream.first_token_at is not None:
            self.ttft.labels(model).observe(stream.first_token_at - stream.submitted)
            if n_tokens > 1:
                self.tpot.labels(model).observe((now - stream.first_token_at) / (n_tokens - 1))
