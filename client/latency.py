"""Latency summaries: the one percentile helper of the stream's summary and the benchmark, and the stream's
constant-memory histogram."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class LatencyHistogram:
    """Latencies in fixed log-spaced bins (1% wide, 0.01 ms to 1000 s): percentiles within 1% in constant memory."""

    LOW_MS, HIGH_MS, BINS = 0.01, 1e6, 1850

    def __init__(self) -> None:
        self.counts = np.zeros(self.BINS + 1, np.int64)
        self.n = 0
        self.total = 0.0
        self.max = 0.0
        self._scale = self.BINS / np.log(self.HIGH_MS / self.LOW_MS)

    def append(self, value_ms: float) -> None:
        value_ms = float(value_ms)
        position = np.log(max(value_ms, self.LOW_MS) / self.LOW_MS) * self._scale
        self.counts[min(int(position), self.BINS)] += 1
        self.n += 1
        self.total += value_ms
        self.max = max(self.max, value_ms)

    def percentile(self, q: float) -> float:
        """The upper edge of the bin holding the q-th percentile (capped at the largest value seen)."""
        rank = int(np.ceil(q / 100 * self.n)) or 1
        index = int(np.searchsorted(np.cumsum(self.counts), rank))
        return min(float(self.LOW_MS * np.exp((index + 1) / self._scale)), self.max)

    def __len__(self) -> int:
        return self.n


def percentiles(values_ms: Sequence[float] | np.ndarray | LatencyHistogram,
                digits: int = 2) -> dict[str, float | int | None]:
    """n, p50, p95, p99, mean and max of latencies in milliseconds, rounded to `digits`; None for no values.
    Exact for a sequence; within the bin width (1%) for a LatencyHistogram."""
    if isinstance(values_ms, LatencyHistogram):
        n, mean, largest = values_ms.n, values_ms.total / max(values_ms.n, 1), values_ms.max
        quantiles = [values_ms.percentile(q) for q in (50, 95, 99)] if n else []
    else:
        arr = np.asarray(values_ms, np.float64)
        n = int(arr.size)
        quantiles = list(np.percentile(arr, [50, 95, 99])) if n else []
        mean, largest = (float(arr.mean()), float(arr.max())) if n else (0.0, 0.0)
    if not n:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    p50, p95, p99 = (round(float(q), digits) for q in quantiles)
    return {"n": n, "p50": p50, "p95": p95, "p99": p99, "mean": round(float(mean), digits),
            "max": round(float(largest), digits)}
