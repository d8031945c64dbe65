"""Per-deployment serving metrics kept by the broker.

Counters are totals since the broker started. Distributions keep the most
recent samples in a fixed ring (so memory is bounded and percentiles reflect
current behaviour, not the day's average) plus an all-time count and sum.
Names follow what operators know from Triton and TorchServe: queue time, time
to first chunk (first response), total latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

RING = 4096


class Distribution:
    __slots__ = ("_ring", "_next", "count", "total")

    def __init__(self) -> None:
        self._ring: list[float] = []
        self._next = 0
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if len(self._ring) < RING:
            self._ring.append(value)
        else:
            self._ring[self._next] = value
            self._next = (self._next + 1) % RING

    def summary(self) -> dict[str, Any]:
        if not self._ring:
            return {"count": 0}
        ordered = sorted(self._ring)
        return {
            "count": self.count,
            "mean": self.total / self.count,
            "p50": percentile(ordered, 50),
            "p90": percentile(ordered, 90),
            "p99": percentile(ordered, 99),
            "max": ordered[-1],
            "window": len(ordered),
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list: the smallest sample
    with at least ``pct`` percent of the samples at or below it."""
    if not ordered:
        raise ValueError("no samples")
    # Rounded first so that float error (0.29 * 100 = 28.999...) cannot move the rank.
    rank = math.ceil(round(pct * len(ordered) / 100, 9))
    return ordered[max(1, min(len(ordered), rank)) - 1]


COUNTERS = ("completed", "failed", "rejected_backpressure", "timed_out", "cancelled", "bad_request")
DISTRIBUTIONS = ("queue_ms", "first_chunk_ms", "latency_ms")


@dataclass
class DeploymentMetrics:
    completed: int = 0
    failed: int = 0
    rejected_backpressure: int = 0
    timed_out: int = 0
    cancelled: int = 0
    bad_request: int = 0
    queue_ms: Distribution = field(default_factory=Distribution)
    first_chunk_ms: Distribution = field(default_factory=Distribution)
    latency_ms: Distribution = field(default_factory=Distribution)

    def snapshot(self, queued: int, in_flight: int) -> dict[str, Any]:
        out: dict[str, Any] = {"queued": queued, "in_flight": in_flight}
        for name in COUNTERS:
            out[name] = getattr(self, name)
        for name in DISTRIBUTIONS:
            out[name] = getattr(self, name).summary()
        return out
