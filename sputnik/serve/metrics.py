"""Prometheus metrics of one server: latency histograms, token counters, and the engine's batch as gauges."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several servers (or tests) in one process never share counts."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("sputnik_time_to_first_token_seconds", "Request arrival to its first token", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("sputnik_inter_token_latency_seconds", "Time between a stream's tokens", buckets=_LATENCY,
                             registry=r)
        self.queue = Histogram("sputnik_queue_time_seconds", "Arrival to the start of its prefill", buckets=_LATENCY,
                               registry=r)
        self.e2e = Histogram("sputnik_request_seconds", "Whole request", buckets=_LATENCY, registry=r)
        self.prompt_tokens = Counter("sputnik_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cache_hit_tokens = Counter("sputnik_prompt_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                        registry=r)
        self.cache_miss_tokens = Counter("sputnik_prompt_cache_miss_tokens", "Prompt tokens computed (prefix cache "
                                         "misses)", registry=r)
        self.generation_tokens = Counter("sputnik_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("sputnik_requests", "Finished requests by outcome", ["outcome"], registry=r)
        self.running = Gauge("sputnik_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("sputnik_requests_waiting", "Sequences waiting for a slot or in prefill", registry=r)
        self.kv_rows = Gauge("sputnik_kv_cache_rows_used", "KV cache rows holding a sequence", registry=r)

    def watch(self, running: Callable[[], float], waiting: Callable[[], float], kv_rows: Callable[[], float]) -> None:
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_rows.set_function(kv_rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
