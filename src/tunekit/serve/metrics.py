"""Prometheus metrics of the server (prometheus-client, one registry per server)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tunekit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.errors = Counter("tunekit_errors", "Error responses by status", ["status"], registry=r)
        self.prompt_tokens = Counter("tunekit_prompt_tokens", "Prompt tokens received", ["model"], registry=r)
        self.generated = Counter("tunekit_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.adapter_requests = Counter("tunekit_adapter_requests", "Finished requests per model (listed from "
                                        "load, also when idle)", ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("tunekit_time_to_first_token_seconds", "Submission to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tunekit_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("tunekit_step_seconds", "Engine step duration", buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.queue = Gauge("tunekit_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("tunekit_running_sequences", "Sequences in the running batch", registry=r)

    def adapter_listed(self, model: str) -> None:
        for reason in ("stop", "length"):
            self.adapter_requests.labels(model, reason)
        self.prompt_tokens.labels(model)
        self.generated.labels(model)

    def submitted(self, seq, model: str) -> None:
        seq.submitted_at = time.monotonic()
        seq.model_label = model
        self.prompt_tokens.labels(model).inc(len(seq.prompt_ids))

    def step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def token(self, seq) -> None:
        now = time.monotonic()
        model = getattr(seq, "model_label", "?")
        self.generated.labels(model).inc()
        last = getattr(seq, "last_token_at", None)
        if last is None:
            self.ttft.labels(model).observe(now - getattr(seq, "submitted_at", now))
        else:
            self.itl.observe(now - last)
        seq.last_token_at = now

    def finished(self, seq, reason: str) -> None:
        self.adapter_requests.labels(getattr(seq, "model_label", "?"), reason).inc()

    def render(self, engine) -> bytes:
        lanes = engine.lanes()
        self.queue.set(sum(len(lane.scheduler.waiting) for lane in lanes) + len(engine._inbox))
        self.running.set(sum(len(lane.scheduler.running) for lane in lanes))
        return generate_latest(self.registry)
