"""Percentile summaries of timing samples."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """``{p50, p95, mean, min, max, n}`` of ``values`` (None when there are none)."""
    if len(values) == 0:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(arr, 50)),
        "p95": float(np.percentile(arr, 95)),
        "mean": float(arr.mean()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def interleaved_median_ms(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median milliseconds per call of each of ``fns``, timed round-robin over ``iters`` rounds
    after one warm-up call each (a warm-up returning None is an error: nothing was computed), so
    that machine noise falls on all of them alike."""
    for name, fn in fns.items():
        if fn() is None:
            raise ValueError(f"{name} returned nothing")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}
