"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Reads the engine's live state (running/waiting sequences, KV cache) at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("llmc_num_requests_running", "Sequences being generated now.",
                                value=s.get("running", 0))
        yield GaugeMetricFamily("llmc_num_requests_waiting", "Sequences queued for admission.",
                                value=s.get("waiting", 0))
        yield GaugeMetricFamily("llmc_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).",
                                value=s.get("kv_usage", 0.0))
        yield GaugeMetricFamily("llmc_kv_cache_used_blocks", "KV cache blocks in use.",
                                value=s.get("kv_used_blocks", 0))
        yield GaugeMetricFamily("llmc_kv_cache_total_blocks", "KV cache blocks in all.",
                                value=s.get("kv_total_blocks", 0))
        yield GaugeMetricFamily("llmc_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache (0..1).",
                                value=s.get("prefix_cache_hit_rate", 0.0))
        yield GaugeMetricFamily("llmc_generation_tokens_per_second", "Engine decode throughput, last 10 s.",
                                value=s.get("generation_tok_s", 0.0))
        yield CounterMetricFamily("llmc_num_preemptions", "Sequences preempted (KV cache full) and recomputed.",
                                  value=s.get("num_preemptions", 0))
        steps = CounterMetricFamily("llmc_engine_steps", "Engine steps run, by kind: decode (one token per "
                                    "sequence, each sampled) or other (with a prompt chunk).", labels=["kind"])
        seconds = CounterMetricFamily("llmc_engine_executor_seconds", "The engine loop's time in the executor "
                                      "(forward pass and sampling), by step kind; / steps = mean step time.",
                                      labels=["kind"])
        for kind in ("decode", "other"):
            steps.add_metric([kind], s.get(f"{kind}_steps", 0))
            seconds.add_metric([kind], s.get(f"{kind}_executor_s", 0.0))
        yield steps
        yield seconds

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ServerMetrics:
    """Counters and histograms updated by the request handlers."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("llmc_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("llmc_time_to_first_token_seconds",
                              "Time from request arrival to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("llmc_time_per_output_token_seconds",
                              "Mean time between generated tokens of a sequence (after the first).",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llmc_request_latency_seconds", "Time from request arrival to its last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llmc_prompt_tokens", "Prompt tokens of admitted sequences.", registry=r)
        self.generation_tokens = Counter("llmc_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter("llmc_sequences_finished", "Finished sequences by finish reason (stop, length, error).",
                                ["finish_reason"], registry=r)
        self.aborted = Counter("llmc_sequences_aborted",
                               "Sequences cancelled before finishing (client disconnected).", registry=r)
        r.register(_EngineCollector(engine_stats))

    def observe_sequence(self, *, arrival: float, first_token: float | None, last_token: float | None,
                         generated: int) -> None:
        """Record one finished sequence's latencies."""
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        if last_token is not None:
            self.e2e.observe(last_token - arrival)
            if generated > 1:
                self.tpot.observe((last_token - first_token) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
