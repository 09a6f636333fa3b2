"""The request routers' Prometheus counters, in the process that routes (the one holding the deployment handle).

A router is built by Serve inside a handle (the gateway's, or Serve's proxy's), not by Herd, so its counters
live in one registry per process, here; the gateway's /metrics serves it beside its own. Serve's gRPC proxy
(the chart's gateway outside Ray) routes in the proxy actor, whose counters no Herd endpoint serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()

PREFIX_HITS = Counter("herd_router_prefix_hits", "Requests prefix routing sent to a replica that had served a "
                      "prefix of their prompt", ["model"], registry=REGISTRY)
PREFIX_MISSES = Counter("herd_router_prefix_misses", "Requests prefix routing sent to a replica that had served "
                        "none of their prompt (new prompts, overloaded holders, prompts under one chunk)",
                        ["model"], registry=REGISTRY)
PREFIX_MATCHED_CHUNKS = Counter("herd_router_prefix_matched_chunks", "Prompt chunks (KV blocks) the chosen "
                                "replicas had served before, summed over routed requests", ["model"],
                                registry=REGISTRY)


def count_routed(model: str, matched_chunks: int) -> None:
    """A request to `model` was routed to a replica that had served matched_chunks of its prompt."""
    if matched_chunks:
        PREFIX_HITS.labels(model).inc()
        PREFIX_MATCHED_CHUNKS.labels(model).inc(matched_chunks)
    else:
        PREFIX_MISSES.labels(model).inc()


__all__ = ["PREFIX_HITS", "PREFIX_MATCHED_CHUNKS", "PREFIX_MISSES", "REGISTRY", "count_routed"]
