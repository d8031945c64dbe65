"""Unit tests for inferd.metrics."""

from __future__ import annotations

import random

import pytest

from inferd import metrics
from inferd.metrics import COUNTERS, DISTRIBUTIONS, RING, DeploymentMetrics, Distribution, percentile


def nearest_rank(ordered: list, pct: int):
    """The textbook nearest-rank percentile: the ceil(pct/100 * N)-th smallest value (1-based)."""
    n = len(ordered)
    rank = max(1, -(-pct * n // 100))  # exact integer ceil
    return ordered[rank - 1]


# --- percentile -------------------------------------------------------------------------------


def test_percentile_of_empty_raises():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_single_sample():
    for pct in (0, 1, 50, 90, 99, 100):
        assert percentile([7.0], pct) == 7.0


def test_percentile_extremes():
    data = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(data, 0) == 1.0
    assert percentile(data, 100) == 5.0


def test_percentile_five_samples():
    data = [10.0, 20.0, 30.0, 40.0, 50.0]
    # ceil(0.5*5)=3, ceil(0.9*5)=5, ceil(0.99*5)=5, ceil(0.2*5)=1, ceil(0.21*5)=2
    assert percentile(data, 50) == 30.0
    assert percentile(data, 90) == 50.0
    assert percentile(data, 99) == 50.0
    assert percentile(data, 20) == 10.0
    assert percentile(data, 21) == 20.0


def test_percentile_two_samples_median_is_the_lower():
    # Nearest rank: ceil(0.5 * 2) = 1 -> the first sample.
    assert percentile([1.0, 2.0], 50) == 1.0


def test_percentile_ten_samples():
    data = [float(v) for v in range(1, 11)]
    # Nearest rank: p50 -> rank 5, p90 -> rank 9, p99 -> rank 10.
    assert percentile(data, 50) == 5.0
    assert percentile(data, 90) == 9.0
    assert percentile(data, 99) == 10.0


def test_percentile_hundred_samples():
    data = [float(v) for v in range(1, 101)]
    assert percentile(data, 50) == 50.0
    assert percentile(data, 90) == 90.0
    assert percentile(data, 99) == 99.0


def test_percentile_matches_nearest_rank_for_many_sizes():
    mismatches = []
    for n in range(1, 201):
        data = [float(v) for v in range(n)]
        for pct in (25, 50, 75, 90, 99):
            got, want = percentile(data, pct), nearest_rank(data, pct)
            if got != want:
                mismatches.append((n, pct, got, want))
    assert mismatches == []


# --- Distribution -----------------------------------------------------------------------------


def test_summary_of_empty():
    assert Distribution().summary() == {"count": 0}
    assert Distribution().histogram()["count"] == 0 and not any(Distribution().histogram()["counts"])


def test_histogram_buckets_are_cumulative_and_inclusive():
    d = Distribution(buckets_s=(0.001, 0.01, 0.1))
    for ms in (0.5, 1.0, 1.5, 10.0, 50.0, 100.0, 250.0):
        d.add(ms)
    h = d.histogram()
    assert h["le_ms"] == [1.0, 10.0, 100.0]
    # le is inclusive (Prometheus's rule): 1.0 ms lands in the 1 ms bucket; 250 ms only in +Inf.
    assert h["counts"] == [2, 4, 6]
    assert h["count"] == 7 and h["sum_ms"] == pytest.approx(413.0)


def test_summary_known_data():
    d = Distribution()
    values = [3.0, 1.0, 4.0, 1.0, 5.0]  # sorted: 1 1 3 4 5
    for v in values:
        d.add(v)
    s = d.summary()
    assert s == {"count": 5, "mean": 14.0 / 5, "p50": 3.0, "p90": 5.0, "p99": 5.0, "max": 5.0, "window": 5}
    assert d.count == 5
    assert d.total == 14.0


def test_summary_ten_samples_uses_nearest_rank():
    d = Distribution()
    values = list(range(1, 11))
    random.Random(3).shuffle(values)
    for v in values:
        d.add(float(v))
    s = d.summary()
    assert s["count"] == 10
    assert s["mean"] == 5.5
    assert s["max"] == 10.0
    assert s["window"] == 10
    assert (s["p50"], s["p90"], s["p99"]) == (5.0, 9.0, 10.0)


def test_summary_does_not_depend_on_insertion_order():
    values = [float(v) for v in range(1, 38)]
    a, b = Distribution(), Distribution()
    for v in values:
        a.add(v)
    shuffled = values[:]
    random.Random(1).shuffle(shuffled)
    for v in shuffled:
        b.add(v)
    assert a.summary() == b.summary()


def test_ring_window_is_capped_and_count_keeps_growing():
    d = Distribution()
    # First a burst of huge values, then RING ordinary ones: the huge ones leave the window.
    for _ in range(100):
        d.add(1_000_000.0)
    for _ in range(RING):
        d.add(2.0)
    s = d.summary()
    assert s["count"] == RING + 100
    assert s["window"] == RING
    assert s["max"] == 2.0
    assert s["p99"] == 2.0
    # mean is all-time, not windowed
    assert s["mean"] == pytest.approx((100 * 1_000_000.0 + RING * 2.0) / (RING + 100))
    assert d.total == 100 * 1_000_000.0 + RING * 2.0


def test_ring_replaces_oldest_samples_first():
    d = Distribution()
    total = RING + 250
    for v in range(total):
        d.add(float(v))
    s = d.summary()
    assert s["count"] == total
    assert s["window"] == RING
    # The window holds the last RING values: 250 .. total-1.
    assert s["max"] == float(total - 1)
    window = [float(v) for v in range(250, total)]
    assert s["p50"] == nearest_rank(window, 50)
    assert s["mean"] == pytest.approx(sum(range(total)) / total)


def test_ring_wraps_more_than_once(monkeypatch):
    monkeypatch.setattr(metrics, "RING", 4)
    d = Distribution()
    for v in [9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        d.add(v)
    s = d.summary()
    assert s["count"] == 10
    assert s["window"] == 4
    assert s["max"] == 6.0
    assert sorted(d._ring) == [3.0, 4.0, 5.0, 6.0]
    assert s["mean"] == pytest.approx(57.0 / 10)


# --- DeploymentMetrics ------------------------------------------------------------------------


def test_snapshot_keys_and_values():
    m = DeploymentMetrics()
    m.completed = 3
    m.failed = 1
    m.rejected_backpressure = 2
    m.timed_out = 4
    m.cancelled = 5
    m.bad_request = 6
    m.latency_ms.add(10.0)
    m.latency_ms.add(30.0)
    snap = m.snapshot(queued=7, in_flight=2)
    m.final("OK")
    m.final("OK")
    m.final("CANCELLED")
    snap = m.snapshot(queued=7, in_flight=2)
    assert set(snap) == {"queued", "in_flight", "finals", "histograms", *COUNTERS, *DISTRIBUTIONS}
    assert set(snap) == {"queued", "in_flight", "finals", "histograms", "completed", "failed", "rejected_backpressure",
                         "timed_out", "cancelled", "bad_request", "prompt_tokens", "generated_tokens", "queue_ms",
                         "first_chunk_ms", "inter_chunk_ms", "latency_ms"}
    assert snap["finals"] == {"OK": 2, "CANCELLED": 1}
    assert snap["queued"] == 7
    assert snap["in_flight"] == 2
    assert (snap["completed"], snap["failed"], snap["rejected_backpressure"], snap["timed_out"],
            snap["cancelled"], snap["bad_request"]) == (3, 1, 2, 4, 5, 6)
    assert snap["queue_ms"] == {"count": 0}
    assert snap["histograms"]["latency_ms"]["count"] == 2
    assert snap["first_chunk_ms"] == {"count": 0}
    assert snap["latency_ms"]["count"] == 2
    assert snap["latency_ms"]["mean"] == 20.0
    assert snap["latency_ms"]["max"] == 30.0
    assert snap["latency_ms"]["window"] == 2


def test_fresh_metrics_are_zero_and_independent():
    a, b = DeploymentMetrics(), DeploymentMetrics()
    a.queue_ms.add(1.0)
    assert b.queue_ms.summary() == {"count": 0}
    snap = b.snapshot(0, 0)
    assert all(snap[name] == 0 for name in COUNTERS)
