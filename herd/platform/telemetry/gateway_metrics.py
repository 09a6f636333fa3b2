"""The gateway's Prometheus metrics: what every request did, by model and tenant, and the load it holds now.

One registry per gateway (not prometheus-client's global one), served at /metrics with the control
plane's when it runs in the same process. Names and labels are listed in docs/METRICS.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Seconds. TTFT spans a warm decode (ms) to a cold start (a minute); ITL is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class LoadView(Protocol):
    """The gateway's LoadTracker, as far as the gauges read it."""

    def snapshot(self) -> dict[str, dict[str, float | None]]: ...


class GatewayMetrics:
    def __init__(self, load: LoadView | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("herd_requests", "Requests that reached a model, by how they ended",
                                ["model", "tenant", "status"], registry=r)
        self.rejected = Counter("herd_rejected_requests", "Requests refused before reaching a model "
                                "(bad input, unknown or forbidden model, bad key), by gRPC status name",
                                ["code"], registry=r)
        self.rate_limited = Counter("herd_rate_limited_requests", "Requests refused by a tenant limit (429)",
                                    ["model", "tenant", "limit"], registry=r)
        self.ttft = Histogram("herd_time_to_first_token_seconds", "From admission to the first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("herd_inter_token_latency_seconds", "Between consecutive output tokens",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("herd_e2e_request_latency_seconds", "From admission to the last token",
                             ["model", "status"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("herd_prompt_tokens", "Prompt tokens of admitted requests",
                                     ["model", "tenant"], registry=r)
        self.cached_tokens = Counter("herd_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     ["model", "tenant"], registry=r)
        self.generation_tokens = Counter("herd_generation_tokens", "Output tokens sent to clients",
                                         ["model", "tenant"], registry=r)
        self.migrated = Counter("herd_migrated_requests", "Requests sent again after their replica died or could "
                                "not be reached (continued from the tokens they had streamed), once per attempt",
                                ["model"], registry=r)
        if load is not None:
            r.register(_LoadCollector(load))


class _LoadCollector(Collector):
    """Gauges read from the load tracker at scrape time."""

    def __init__(self, load: LoadView) -> None:
        self.load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.load.snapshot()
        gauges = {
            "in_flight": GaugeMetricFamily("herd_requests_in_flight", "Admitted requests not yet finished",
                                           labels=["model"]),
            "waiting_for_replica": GaugeMetricFamily("herd_requests_waiting_for_replica", "Held for a replica of "
                                                     "a model scaled to zero", labels=["model"]),
            "in_flight_tokens": GaugeMetricFamily("herd_in_flight_tokens", "Prompt + max_tokens of the requests "
                                                  "in flight", labels=["model"]),
            "awaiting_first_token": GaugeMetricFamily("herd_requests_awaiting_first_token", "Requests in flight "
                                                      "with no output token yet", labels=["model"]),
        }
        for model, values in snapshot.items():
            for key, gauge in gauges.items():
                gauge.add_metric([model], float(values[key] or 0))
        yield from gauges.values()

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


__all__ = ["GatewayMetrics"]
