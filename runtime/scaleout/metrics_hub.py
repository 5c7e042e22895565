"""``/metrics`` over many replicas: every engine replica pushes its Prometheus text to one hub
(a Serve deployment) every ``interval_s``; the ingress merges the hub's reports with its own
HTTP counters, adding ``model`` and ``replica`` labels to each replica's series.

A replica that stops reporting (it died, or was scaled down) is dropped after ``ttl_s``; the
hub's list of live replicas also answers ``/health``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

HTTP_FAMILY = "llmc_http_requests"  # the ingress's own series; every other family comes from the replicas


@dataclass
class Report:
    """One replica's last push."""

    model: str
    replica: str
    text: str
    at: float


class MetricsHub:
    """Holds the latest report of every live replica (deployed as a one-replica Serve deployment)."""

    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self._reports: dict[str, Report] = {}

    def report(self, model: str, replica: str, text: str) -> None:
        self._reports[replica] = Report(model, replica, text, time.monotonic())

    def forget(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def snapshot(self) -> list[Report]:
        """The reports of the replicas heard from within ``ttl_s``."""
        now = time.monotonic()
        for rid in [r for r, rep in self._reports.items() if now - rep.at > self.ttl_s]:
            del self._reports[rid]
        return sorted(self._reports.values(), key=lambda r: (r.model, r.replica))


def _relabeled(families: Iterable[Metric], labels: dict[str, str]) -> Iterator[Metric]:
    for family in families:
        family.samples = [s._replace(labels={**s.labels, **labels}) for s in family.samples]
        yield family


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def merge_metrics(own: CollectorRegistry, reports: list[Report]) -> bytes:
    """Prometheus text with the ingress's HTTP counters from ``own`` and every series of every
    report labelled with its ``model`` and ``replica`` (one family per name, as the format requires)."""
    merged: dict[str, Metric] = {}

    def add(family: Metric) -> None:
        if family.name in merged:
            merged[family.name].samples.extend(family.samples)
        else:
            merged[family.name] = family

    for family in own.collect():
        if family.name == HTTP_FAMILY:
            add(family)
    for rep in reports:
        parsed = text_string_to_metric_families(rep.text)
        for family in _relabeled(parsed, {"model": rep.model, "replica": rep.replica}):
            if family.name != HTTP_FAMILY:
                add(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)
