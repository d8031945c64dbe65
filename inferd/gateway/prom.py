"""Prometheus exposition of the broker's own metrics, from one registry in the gateway.

A scrape asks the broker for its METRICS and STATUS (two control round trips)
and renders them: the broker's counters as counters, its distributions'
buckets as histograms, its queue and worker table as gauges. Nothing is
counted twice and nothing lives in per-process files, so there is no
prometheus_client multiprocess mode to pile up files as workers restart.
docs/metrics.md lists every metric with its vLLM and Triton counterparts.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Worker states a deployment's workers can be in, always exported (0 included) so that
# dashboards and alerts find every series.
WORKER_STATES = ("starting", "loading", "warming", "ready", "rebuilding", "poisoned", "restarting", "failed",
                 "stopped")

# broker distribution -> (metric name, help)
HISTOGRAMS = {
    "queue_ms": ("inferd_request_queue_time_seconds", "Time requests waited in the queue before dispatch."),
    "first_chunk_ms": ("inferd_time_to_first_token_seconds",
                       "Time from arrival to the first chunk (token) of a request."),
    "inter_chunk_ms": ("inferd_inter_token_latency_seconds", "Time between consecutive chunks of a request."),
    "latency_ms": ("inferd_e2e_request_latency_seconds", "Time from arrival to the final reply of completed "
                                                         "requests."),
}


class BrokerCollector:
    """Renders one snapshot: ``metrics`` (METRICS) and ``status`` (STATUS), set before each scrape."""

    def __init__(self) -> None:
        self.metrics: dict[str, Any] = {}
        self.status: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        deployments = sorted(self.metrics)
        finals = CounterMetricFamily("inferd_requests", "Requests by final reply: OK, or the error code.",
                                     labels=["deployment", "code"])
        waiting = GaugeMetricFamily("inferd_requests_waiting", "Requests in the queue.", labels=["deployment"])
        running = GaugeMetricFamily("inferd_requests_running", "Requests dispatched to a worker and not finished.",
                                    labels=["deployment"])
        prompt = CounterMetricFamily("inferd_prompt_tokens", "Prompt tokens, as the workers report them.",
                                     labels=["deployment"])
        generated = CounterMetricFamily("inferd_generation_tokens", "Generated tokens (chunks streamed).",
                                        labels=["deployment"])
        rejected = CounterMetricFamily("inferd_backpressure_rejections",
                                       "Requests refused or evicted because the queue was full.",
                                       labels=["deployment"])
        for name in deployments:
            m = self.metrics[name]
            for code, count in sorted(m.get("finals", {}).items()):
                finals.add_metric([name, code], count)
            waiting.add_metric([name], m["queued"])
            running.add_metric([name], m["in_flight"])
            prompt.add_metric([name], m["prompt_tokens"])
            generated.add_metric([name], m["generated_tokens"])
            rejected.add_metric([name], m["rejected_backpressure"])
        yield from (finals, waiting, running, prompt, generated, rejected)
        for key, (metric, help_text) in HISTOGRAMS.items():
            family = HistogramMetricFamily(metric, help_text, labels=["deployment"])
            for name in deployments:
                h = self.metrics[name]["histograms"][key]
                buckets = [(floatToGoString(le / 1000), n) for le, n in zip(h["le_ms"], h["counts"])]
                buckets.append(("+Inf", h["count"]))
                family.add_metric([name], buckets, h["sum_ms"] / 1000)
            yield family
        yield from self._workers(deployments)

    def _workers(self, deployments: list[str]) -> Iterator[Metric]:
        states = GaugeMetricFamily("inferd_workers", "Worker processes by state.", labels=["deployment", "state"])
        restarts = CounterMetricFamily("inferd_worker_restarts", "Worker restarts by reason: context_poisoned, "
                                       "unknown (crash, signal, hang), operator.", labels=["deployment", "reason"])
        count: dict[tuple[str, str], int] = {(d, s): 0 for d in deployments for s in WORKER_STATES}
        reasons: dict[tuple[str, str], int] = {}
        for row in self.status.get("workers", []):
            key = (row["deployment"], row["state"])
            count[key] = count.get(key, 0) + 1
            for reason, n in row.get("restart_reasons", {}).items():
                reasons[(row["deployment"], reason)] = reasons.get((row["deployment"], reason), 0) + n
        for (dep, state), n in sorted(count.items()):
            states.add_metric([dep, state], n)
        for (dep, reason), n in sorted(reasons.items()):
            restarts.add_metric([dep, reason], n)
        yield states
        yield restarts


class Exporter:
    """The gateway's one registry."""

    def __init__(self) -> None:
        self.collector = BrokerCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def render(self, metrics: dict[str, Any], status: dict[str, Any]) -> bytes:
        # Set and rendered with no await in between: concurrent scrapes cannot mix their snapshots.
        self.collector.metrics, self.collector.status = metrics, status
        return generate_latest(self.registry)
