"""Prometheus metrics of the HTTP server (`prometheus_client`, one registry per server).

Names (all prefixed `readme_`): requests_total{status} (ok | error | cancelled | rejected |
invalid), queue_length, running_requests, generated_tokens_total, tokens_per_second (over the
last `window_s` seconds of wall time), time_to_first_token_seconds and
inter_token_latency_seconds (histograms, wall time seen by the engine thread),
expert_cache_{hits,misses,loads}_total, expert_cache_bytes_moved_total, engine_steps_total,
unique_experts_per_step (histogram of the distinct experts a step's batch needs),
lookahead_{hits,dropped}_total (the backend's lookahead decode steps taken / discarded; they
stay 0 on a backend without `lookahead_stats`), retry_after_seconds (the Retry-After a 429
would carry now; set by the HTTP app, see `http.retry_after_estimate`), engine_healthy (1, or 0
after an engine step failed: the server then stops, see `worker.py`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATUSES = ("ok", "error", "cancelled", "rejected", "invalid")


class ServeMetrics:
    """The server's metrics; the engine thread and the HTTP handlers both update them
    (prometheus_client metrics are thread-safe)."""

    def __init__(self, window_s: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "readme_requests", "Requests by final status", ["status"], registry=r
        )
        for s in STATUSES:
            self.requests.labels(s)
        self.queue = Gauge("readme_queue_length", "Requests waiting for a slot", registry=r)
        self.running = Gauge("readme_running_requests", "Requests decoding", registry=r)
        self.tokens = Counter("readme_generated_tokens", "Tokens generated", registry=r)
        self.tok_s = Gauge(
            "readme_tokens_per_second", "Generated tokens/s, recent window", registry=r
        )
        self.ttft = Histogram(
            "readme_time_to_first_token_seconds",
            "Submission to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "readme_inter_token_latency_seconds",
            "Between consecutive tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hits = Counter("readme_expert_cache_hits", "Expert cache hits", registry=r)
        self.misses = Counter("readme_expert_cache_misses", "Expert cache misses", registry=r)
        self.loads = Counter("readme_expert_cache_loads", "Expert host->device loads", registry=r)
        self.bytes = Counter(
            "readme_expert_cache_bytes_moved", "Expert bytes copied to the device", registry=r
        )
        self.steps = Counter("readme_engine_steps", "Engine steps", registry=r)
        self.unique = Histogram(
            "readme_unique_experts_per_step",
            "Distinct experts needed by a step's batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.ahead_hits = Counter(
            "readme_lookahead_hits", "Lookahead decode steps taken", registry=r
        )
        self.ahead_dropped = Counter(
            "readme_lookahead_dropped", "Lookahead decode steps discarded", registry=r
        )
        self.retry_after = Gauge(
            "readme_retry_after_seconds", "Retry-After a 429 would carry now", registry=r
        )
        self.healthy = Gauge(
            "readme_engine_healthy", "1 while the engine steps; 0 after it failed", registry=r
        )
        self.healthy.set(1)
        self.window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._last_cache = (0, 0, 0, 0)
        self._last_ahead = (0, 0)

    def on_step(
        self,
        now: float,
        new_tokens: int,
        unique_experts: int | None,
        cache,
        lookahead: Mapping[str, int] | None = None,
    ) -> None:
        """After an engine step: token rate, step counters, cache deltas (`cache`: CacheStats),
        lookahead deltas (`lookahead`: the backend's {"hits", "dropped"}, None if it has none).
        A source that went back (a fresh cache, reset stats) counts from 0 again."""
        self.tokens.inc(new_tokens)
        self._recent.append((now, new_tokens))
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-9) if len(self._recent) > 1 else 0.0
        self.tok_s.set(sum(n for _, n in list(self._recent)[1:]) / span if span else 0.0)
        if unique_experts is not None:
            self.steps.inc()
            self.unique.observe(unique_experts)
        cur = (cache.hits, cache.misses, cache.loads, cache.bytes_moved)
        _add((self.hits, self.misses, self.loads, self.bytes), cur, self._last_cache)
        self._last_cache = cur
        if lookahead is not None:
            cur = (lookahead.get("hits", 0), lookahead.get("dropped", 0))
            _add((self.ahead_hits, self.ahead_dropped), cur, self._last_ahead)
            self._last_ahead = cur

    def idle(self) -> None:
        self.tok_s.set(0.0)
        self._recent.clear()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _add(counters, cur, last) -> None:
    """Increment each counter by its source's growth since `last` (all of it after a reset)."""
    for c, a, b in zip(counters, cur, last, strict=True):
        if a != b:
            c.inc(a - b if a > b else a)


def now() -> float:
    return time.monotonic()
