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

# One sample per deployment: (family, metric name, help, key in the deployment's METRICS).
PER_DEPLOYMENT = (
    (GaugeMetricFamily, "inferd_requests_waiting", "Requests in the queue.", "queued"),
    (GaugeMetricFamily, "inferd_requests_running", "Requests dispatched to a worker and not finished.", "in_flight"),
    (CounterMetricFamily, "inferd_prompt_tokens", "Prompt tokens, as the workers report them.", "prompt_tokens"),
    (CounterMetricFamily, "inferd_generation_tokens", "Generated tokens (chunks streamed).", "generated_tokens"),
    (CounterMetricFamily, "inferd_backpressure_rejections", "Requests refused or evicted because the queue was full.",
     "rejected_backpressure"),
)

# A remote deployment's counters, summed over its workers: (metric name, help, key in a worker's figures).
UPSTREAM_COUNTERS = (
    ("inferd_upstream_attempts", "Calls to remote providers, retries included.", "attempts"),
    ("inferd_upstream_retries", "Calls retried before the first token.", "retries"),
    ("inferd_upstream_failovers", "Retries sent to another upstream.", "failovers"),
)

# broker distribution -> (metric name, help)
HISTOGRAMS = {
    "queue_ms": ("inferd_request_queue_time_seconds", "Time requests waited in the queue before dispatch."),
    "first_chunk_ms": ("inferd_time_to_first_token_seconds",
                       "Time from arrival to the first chunk (token) of a request."),
    "inter_chunk_ms": ("inferd_inter_token_latency_seconds", "Time between consecutive chunks of a request."),
    "latency_ms": ("inferd_e2e_request_latency_seconds", "Time from arrival to the final reply of completed "
                                                         "requests."),
}

# a remote worker's upstream histogram -> (metric name, help)
UPSTREAM_HISTOGRAMS = {
    "first_token_histogram": ("inferd_upstream_time_to_first_token_seconds",
                              "Remote deployments: from a call to a provider to its first token."),
    "latency_histogram": ("inferd_upstream_request_latency_seconds",
                          "Remote deployments: from a request's first call to its last token, retries included."),
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
        simple = [(kind(metric, help_text, labels=["deployment"]), key)
                  for kind, metric, help_text, key in PER_DEPLOYMENT]
        for name in deployments:
            m = self.metrics[name]
            for code, count in sorted(m.get("finals", {}).items()):
                finals.add_metric([name, code], count)
            for family, key in simple:
                family.add_metric([name], m[key])
        yield finals
        yield from (family for family, _ in simple)
        for key, (metric, help_text) in HISTOGRAMS.items():
            family = HistogramMetricFamily(metric, help_text, labels=["deployment"])
            for name in deployments:
                h = self.metrics[name]["histograms"][key]
                buckets = [(floatToGoString(le / 1000), n) for le, n in zip(h["le_ms"], h["counts"])]
                buckets.append(("+Inf", h["count"]))
                family.add_metric([name], buckets, h["sum_ms"] / 1000)
            yield family
        yield from self._workers(deployments)
        yield from self._upstream(deployments)

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

    def _upstream(self, deployments: list[str]) -> Iterator[Metric]:
        """Remote deployments: what their providers did, summed over each deployment's workers
        (counters and histograms add up; a restarted worker starts its own from zero)."""
        sums = [(CounterMetricFamily(metric, help_text, labels=["deployment"]), key)
                for metric, help_text, key in UPSTREAM_COUNTERS]
        responses = CounterMetricFamily("inferd_upstream_responses", "Provider answers by HTTP status.",
                                        labels=["deployment", "status"])
        errors = CounterMetricFamily("inferd_upstream_errors", "Failed calls by kind: status, timeout, connection, "
                                     "stream_error, invalid_json, invalid_stream, deadline.",
                                     labels=["deployment", "kind"])
        up = GaugeMetricFamily("inferd_upstream_up", "1 while an upstream is healthy, as each worker sees it.",
                               labels=["deployment", "worker", "upstream"])
        histograms = {key: HistogramMetricFamily(metric, help_text, labels=["deployment"])
                      for key, (metric, help_text) in UPSTREAM_HISTOGRAMS.items()}
        for name in deployments:
            per_worker = self.metrics[name].get("upstream", {})
            if not per_worker:
                continue
            status: dict[str, int] = {}
            kinds: dict[str, int] = {}
            for figures in per_worker.values():
                for code, n in figures.get("status", {}).items():
                    status[code] = status.get(code, 0) + n
                for kind, n in figures.get("errors", {}).items():
                    kinds[kind] = kinds.get(kind, 0) + n
            for family, key in sums:
                family.add_metric([name], sum(figures.get(key, 0) for figures in per_worker.values()))
            for code, n in sorted(status.items()):
                responses.add_metric([name, code], n)
            for kind, n in sorted(kinds.items()):
                errors.add_metric([name, kind], n)
            for key, family in histograms.items():
                merged = [f[key] for f in per_worker.values() if key in f]
                if merged:
                    counts = [sum(h["counts"][i] for h in merged) for i in range(len(merged[0]["counts"]))]
                    buckets = [(floatToGoString(le / 1000), n) for le, n in zip(merged[0]["le_ms"], counts)]
                    buckets.append(("+Inf", sum(h["count"] for h in merged)))
                    family.add_metric([name], buckets, sum(h["sum_ms"] for h in merged) / 1000)
        for row in self.status.get("workers", []):
            for u in row.get("runner", {}).get("upstreams", []):
                up.add_metric([row["deployment"], row["id"], u["url"]], 1 if u["state"] == "ok" else 0)
        yield from (family for family, _ in sums)
        yield from (responses, errors, up, *histograms.values())


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
