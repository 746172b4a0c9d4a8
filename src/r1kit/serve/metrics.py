"""Prometheus metrics of the server, in a registry of its own (no process-global state)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.running = Gauge("r1kit_num_requests_running", "sequences being computed", ["model_name"], registry=r).labels(**labels)
        self.waiting = Gauge("r1kit_num_requests_waiting", "sequences waiting to be scheduled", ["model_name"], registry=r).labels(**labels)
        self.kv_usage = Gauge("r1kit_kv_cache_usage_perc", "share of KV-cache blocks held by live sequences", ["model_name"], registry=r).labels(**labels)
        self.prefix_hits = Counter("r1kit_prefix_cache_hits", "prompt tokens served from the prefix cache", ["model_name"], registry=r).labels(**labels)
        self.prefix_queries = Counter("r1kit_prefix_cache_queries", "prompt tokens looked up in the prefix cache", ["model_name"], registry=r).labels(**labels)
        self.prompt_tokens = Counter("r1kit_prompt_tokens", "prompt tokens processed", ["model_name"], registry=r).labels(**labels)
        self.generation_tokens = Counter("r1kit_generation_tokens", "tokens generated", ["model_name"], registry=r).labels(**labels)
        self.finished = Counter("r1kit_request_success", "finished requests by reason", ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("r1kit_time_to_first_token_seconds", "time to first token", ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.tpot = Histogram("r1kit_time_per_output_token_seconds", "time per output token after the first", ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("r1kit_e2e_request_latency_seconds", "request latency, arrival to finish", ["model_name"], buckets=LATENCY_BUCKETS, registry=r).labels(**labels)
        self.model_name = model_name

    def on_step(self, engine, outputs) -> None:
        """Update from the engine thread after a step."""
        self._gauges(engine)
        self.generation_tokens.inc(sum(len(c.delta_token_ids) for out in outputs for c in out.outputs))
        for out in outputs:
            if out.finished:
                self._finished(out)

    def on_abort(self, engine) -> None:
        """A client went away: its request was dropped and its KV blocks freed."""
        self.finished.labels(model_name=self.model_name, finished_reason="abort").inc()
        self._gauges(engine)

    def _gauges(self, engine) -> None:
        sched, blocks = engine.scheduler, engine.block_manager
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        self.kv_usage.set(1.0 - blocks.num_free_blocks / max(1, blocks.num_blocks))

    def _finished(self, out) -> None:
        m = out.metrics
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.prefix_queries.inc(len(out.prompt_token_ids))
        self.prefix_hits.inc(out.num_cached_tokens)
        for c in out.outputs:
            self.finished.labels(model_name=self.model_name, finished_reason=c.finish_reason or "unknown").inc()
        if m is None:
            return
        end = m.finished_time or time.time()
        self.e2e.observe(end - m.arrival_time)
        if m.first_token_time is not None:
            self.ttft.observe(m.first_token_time - m.arrival_time)
            tokens = max(len(c.token_ids) for c in out.outputs)
            if tokens > 1:
                self.tpot.observe((end - m.first_token_time) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
