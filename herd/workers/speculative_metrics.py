"""A replica's speculative-decoding metrics by tenant: what each finished choice drafted and had accepted, and
its acceptance length (tokens made per verifying step), from the engine's RequestOutputs.

Recorded once per finished choice (a request of n choices runs n sequences, each drafting on its own), when
the replica sees its last output; a stream the client abandons before that is counted only in the engine's
totals (herd_replica_speculative_*, read from EngineStats at scrape time). Names are in docs/METRICS.md.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from herd.engine.outputs import RequestOutput

ACCEPTANCE_BUCKETS = (1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 8, 17)
"""Tokens per verifying step: 1 (every draft rejected) to k + 1 (every draft accepted; k is at most 16)."""


def acceptance_length(out: RequestOutput) -> float | None:
    """1 + accepted_tokens / verify_steps: the tokens one verifying step made on average; None when the choice
    verified no drafts (it opted out, or nothing was proposed for it)."""
    if out.verify_steps <= 0:
        return None
    return 1.0 + out.accepted_tokens / out.verify_steps


class SpeculativeMetrics:
    """Counters and a histogram on the replica's registry, labelled by model and tenant."""

    def __init__(self, model: str, registry: CollectorRegistry) -> None:
        self.model = model
        self.drafted = Counter("herd_speculative_draft_tokens", "Draft tokens verified by the model (finished "
                               "requests)", ["model", "tenant"], registry=registry)
        self.accepted = Counter("herd_speculative_accepted_tokens", "Draft tokens the model agreed with (finished "
                                "requests); acceptance rate: accepted / draft", ["model", "tenant"], registry=registry)
        self.length = Histogram("herd_speculative_acceptance_length", "Tokens made per verifying step of a finished "
                                "request's choice (1 + accepted / verifying steps)", ["model", "tenant"],
                                buckets=ACCEPTANCE_BUCKETS, registry=registry)

    def finished(self, out: RequestOutput) -> None:
        """Record a choice's last output; earlier outputs (not finished) and choices that drafted nothing are
        left out."""
        length = acceptance_length(out)
        if not out.finished or (length is None and out.draft_tokens == 0):
            return
        labels = (self.model, out.tenant_id)
        self.drafted.labels(*labels).inc(out.draft_tokens)
        self.accepted.labels(*labels).inc(out.accepted_tokens)
        if length is not None:
            self.length.labels(*labels).observe(length)


__all__ = ["ACCEPTANCE_BUCKETS", "SpeculativeMetrics", "acceptance_length"]
