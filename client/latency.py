"""Latency summaries: the one percentile helper of the stream's summary and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentiles(values_ms: Sequence[float] | np.ndarray, digits: int = 2) -> dict[str, float | int | None]:
    """n, p50, p95, p99, mean and max of latencies in milliseconds, rounded to `digits`; None for no values."""
    arr = np.asarray(values_ms, np.float64)
    if arr.size == 0:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {"n": int(arr.size), "p50": round(float(p50), digits), "p95": round(float(p95), digits),
            "p99": round(float(p99), digits), "mean": round(float(arr.mean()), digits),
            "max": round(float(arr.max()), digits)}
