"""Per-deployment serving metrics kept by the broker.

Counters are totals since the broker started. Distributions keep the most
recent samples in a fixed ring (so memory is bounded and percentiles reflect
current behaviour, not the day's average) plus an all-time count and sum.
Names follow what operators know from Triton and TorchServe: queue time, time
to first chunk (first response), total latency. Each distribution also keeps
fixed histogram buckets (vLLM's, with finer ones below its smallest, since a
serving path without a model answers in microseconds), which the gateway
exports to Prometheus as they are: a scrape reads the broker's own numbers.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

RING = 4096


# Histogram bounds in seconds. vLLM's (vllm/v1/metrics/loggers.py), extended below for fast paths.
FINE_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
REQUEST_BUCKETS_S = FINE_S + (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                              120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Distribution:
    __slots__ = ("_ring", "_next", "count", "total", "_bounds_ms", "_buckets")

    def __init__(self, buckets_s: tuple[float, ...] = REQUEST_BUCKETS_S) -> None:
        self._ring: list[float] = []
        self._next = 0
        self.count = 0
        self.total = 0.0
        self._bounds_ms = [b * 1000 for b in buckets_s]
        self._buckets = [0] * (len(buckets_s) + 1)  # per bucket, not cumulative; the last is +Inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self._buckets[bisect_left(self._bounds_ms, value)] += 1
        if len(self._ring) < RING:
            self._ring.append(value)
        else:
            self._ring[self._next] = value
            self._next = (self._next + 1) % RING

    def histogram(self) -> dict[str, Any]:
        """All-time cumulative bucket counts: ``counts[i]`` samples were <= ``le_ms[i]``."""
        cumulative, running = [], 0
        for n in self._buckets[:-1]:
            running += n
            cumulative.append(running)
        return {"le_ms": list(self._bounds_ms), "counts": cumulative, "count": self.count, "sum_ms": self.total}

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


COUNTERS = ("completed", "failed", "rejected_backpressure", "timed_out", "cancelled", "bad_request",
            "prompt_tokens", "generated_tokens")
DISTRIBUTIONS = ("queue_ms", "first_chunk_ms", "inter_chunk_ms", "latency_ms")


@dataclass
class DeploymentMetrics:
    completed: int = 0
    failed: int = 0
    rejected_backpressure: int = 0
    timed_out: int = 0
    cancelled: int = 0
    bad_request: int = 0
    prompt_tokens: int = 0        # as the workers report them (DONE's usage); 0 where they do not
    generated_tokens: int = 0     # chunks streamed, or the workers' own count where they report one
    queue_ms: Distribution = field(default_factory=Distribution)
    first_chunk_ms: Distribution = field(default_factory=lambda: Distribution(TTFT_BUCKETS_S))
    inter_chunk_ms: Distribution = field(default_factory=lambda: Distribution(ITL_BUCKETS_S))
    latency_ms: Distribution = field(default_factory=Distribution)
    # Final replies by code: "OK" for DONE, else the error code (rejections at SUBMIT included).
    finals: dict[str, int] = field(default_factory=dict)

    def final(self, code: str) -> None:
        self.finals[code] = self.finals.get(code, 0) + 1

    def snapshot(self, queued: int, in_flight: int) -> dict[str, Any]:
        out: dict[str, Any] = {"queued": queued, "in_flight": in_flight, "finals": dict(self.finals)}
        for name in COUNTERS:
            out[name] = getattr(self, name)
        for name in DISTRIBUTIONS:
            out[name] = getattr(self, name).summary()
        out["histograms"] = {name: getattr(self, name).histogram() for name in DISTRIBUTIONS}
        return out
