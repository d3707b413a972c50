"""Prometheus metrics. Counters and histograms are updated as requests stream; the engine's
gauges (requests running and waiting, KV-cache usage) are read from EngineCore.stats() at
scrape time, so they cost nothing between scrapes. Each server has its own registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, with finer ones at the bottom for small models on fast hardware
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)

Stats = Callable[[], "dict[str, float] | None"]


def queue_depth(stats: dict[str, float]) -> int:
    """Requests that will have to wait for a place in the batch. The scheduler's queue lags a
    submission by up to a step (a request sits in the loop's inbox first), so a burst would
    not show in it yet; requests in flight beyond the batch's size do, at once. The larger of
    the two counts is the one a bound must use."""
    return int(max(stats["waiting"], stats["in_flight"] - stats["max_num_seqs"], 0))


class _EngineCollector(Collector):
    def __init__(self, stats: Stats):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:  # no engine yet (starting) or any more: nothing to report
            return
        for name, doc, value in (
            ("requests_running", "Requests in the running batch", stats["running"]),
            ("requests_waiting", "Requests waiting to be scheduled", queue_depth(stats)),
            ("kv_cache_usage", "Share of KV-cache blocks in use (0 to 1)", stats["kv_usage"]),
            ("kv_blocks", "KV-cache blocks in all", stats["kv_blocks"]),
            ("kv_blocks_free", "KV-cache blocks free", stats["kv_blocks_free"]),
            ("replicas_live", "Worker groups serving (data parallel)",
             stats["replicas"] - stats["replicas_failed"]),
            ("prefix_cache_hit_rate", "Share of admitted prompt tokens found in the prefix "
                                      "cache (0 to 1)", stats["prefix_cache_hit_rate"]),
        ):
            yield GaugeMetricFamily(f"tp_engine_{name}", doc, value=value)
        for name, doc in (("preemptions", "Sequences preempted"),
                          ("steps", "Model steps the workers ran"),
                          ("restarts", "Worker groups restarted after a worker died"),
                          ("prefix_cache_queries", "Tokens of admitted sequences looked up "
                                                   "in the prefix cache"),
                          ("prefix_cache_hits", "Of those, tokens found in the cache"),
                          ("model_seconds", "Rank 0's time in the model (forward, LM head, "
                                            "sampling)")):
            yield CounterMetricFamily(f"tp_engine_{name}", doc, value=stats[name])


class Metrics:
    def __init__(self, stats: Stats):
        self.registry = registry = CollectorRegistry()
        registry.register(_EngineCollector(stats))
        self.prompt_tokens = Counter(
            "tp_engine_prompt_tokens", "Prompt tokens admitted", registry=registry)
        self.generation_tokens = Counter(
            "tp_engine_generation_tokens", "Tokens generated", registry=registry)
        self.requests = Counter(
            "tp_engine_requests", "Requests finished, by endpoint and finish reason",
            ["endpoint", "finish_reason"], registry=registry)
        self.rejected = Counter(
            "tp_engine_requests_rejected", "Requests refused before admission, by status",
            ["status"], registry=registry)
        self.ttft = Histogram(
            "tp_engine_time_to_first_token_seconds", "From arrival to the first token",
            buckets=TTFT_BUCKETS, registry=registry)
        self.tpot = Histogram(
            "tp_engine_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            buckets=TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram(
            "tp_engine_e2e_request_latency_seconds", "From arrival to the last token",
            buckets=E2E_BUCKETS, registry=registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
