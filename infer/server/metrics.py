"""Prometheus metrics of the HTTP server (`/metrics`), fed from the engine thread after every step.

Per engine step: committed tokens, rounds, verify tokens; gauges for queue depth, active slots, τ
(committed tokens per request-round), mean verify budget (1 + ℓ per request per round) and
tokens/s over a sliding window. Per finished request: TTFT and time-per-output-token histograms,
requests by finish reason, prompt / completion token counters.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServerMetrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """One registry per server (tests can run several); `render()` is the /metrics body."""

    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.generated = Counter("dspark_generation_tokens", "Completion tokens committed", registry=r)
        self.prompt = Counter("dspark_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.requests = Counter("dspark_requests_finished", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter("dspark_requests_rejected", "Requests refused before the engine", ["reason"], registry=r)
        self.rounds = Counter("dspark_engine_rounds", "Engine verify rounds", registry=r)
        self.verify_tokens = Counter("dspark_verify_tokens", "Packed verify tokens (sum over rounds)", registry=r)
        self.queue_depth = Gauge("dspark_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("dspark_active_slots", "Slots holding a request", registry=r)
        self.tau = Gauge("dspark_acceptance_length", "tau: committed tokens per request-round (engine lifetime)",
                         registry=r)
        self.budget = Gauge("dspark_mean_verify_budget", "Mean verify budget 1 + l per request-round (lifetime)",
                            registry=r)
        self.tokens_per_s = Gauge("dspark_tokens_per_second", f"Committed tokens/s over the last {window_s:g} s",
                                  registry=r)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("dspark_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self._window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._seen = {"rounds": 0, "verify_tokens": 0}

    def on_step(self, engine, outputs, step_s: float) -> None:
        """Engine-thread hook (`EngineRunner(on_step=...)`)."""
        now = time.monotonic()
        new = sum(len(o.new_token_ids) for o in outputs)
        self.generated.inc(new)
        self._recent.append((now, new))
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], step_s, 1e-9) if len(self._recent) > 1 else max(step_s, 1e-9)
        self.tokens_per_s.set(sum(n for _, n in self._recent) / span)
        m: dict[str, Any] = engine.metrics()
        self.rounds.inc(m["rounds"] - self._seen["rounds"])
        self.verify_tokens.inc(m["verify_tokens"] - self._seen["verify_tokens"])
        self._seen = {"rounds": m["rounds"], "verify_tokens": m["verify_tokens"]}
        self.queue_depth.set(m["queue_length"])
        self.active.set(m["active"])
        if m["request_rounds"]:
            self.tau.set(m["tau"])
            self.budget.set(m["mean_verify_budget"])

    def finished(self, out) -> None:
        """Engine-thread hook (`EngineRunner(on_finish=...)`): count a finished request, observe its latencies."""
        self.requests.labels(out.finish_reason or "unknown").inc()
        if out.metrics.get("ttft_s") is not None:
            self.ttft.observe(out.metrics["ttft_s"])
        if out.metrics.get("tpot_s") is not None:
            self.tpot.observe(out.metrics["tpot_s"])

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
