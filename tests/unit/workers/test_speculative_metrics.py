"""A replica's speculative-decoding metrics: draft and accepted tokens per (model, tenant) and the acceptance
length of each finished choice that verified drafts, from the engine's RequestOutputs; the engine's own totals
from EngineStats at scrape time."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from opentelemetry import trace

from herd.engine.outputs import RequestOutput
from herd.engine.stats import EngineStats
from herd.workers.replica_core import ReplicaCore
from herd.workers.replica_metrics import ReplicaMetrics
from herd.workers.speculative_metrics import ACCEPTANCE_BUCKETS, acceptance_length

STATS = EngineStats(running=1, waiting=0, kv_blocks={"full": 8}, kv_blocks_used={"full": 2}, prefix_queried_tokens=0,
                    prefix_hit_tokens=0, preemptions=0, draft_tokens=120, accepted_tokens=75)


def _out(tenant: str, *, drafted: int, accepted: int, steps: int, finished: bool = True,
         index: int = 0) -> RequestOutput:
    return RequestOutput(request_id=f"r-{tenant}-{drafted}", tenant_id=tenant, prompt_token_ids=[1, 2],
                         token_ids=[3], text="x", delta_token_ids=[3], delta_text="x", finished=finished,
                         finish_reason="stop" if finished else None, logprobs=None, num_cached_tokens=0,
                         index=index, draft_tokens=drafted, accepted_tokens=accepted, verify_steps=steps)


def _metrics() -> ReplicaMetrics:
    engine = SimpleNamespace(stats=lambda: STATS)
    load = SimpleNamespace(snapshot=dict)
    return ReplicaMetrics("scout", engine, load)  # type: ignore[arg-type]


def _value(metrics: ReplicaMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "scout", **labels})


def test_acceptance_length_is_tokens_made_per_verifying_step() -> None:
    assert acceptance_length(_out("a", drafted=12, accepted=6, steps=4)) == 2.5
    assert acceptance_length(_out("a", drafted=3, accepted=0, steps=1)) == 1.0
    assert acceptance_length(_out("a", drafted=0, accepted=0, steps=0)) is None, "verified nothing: no length"


def test_counts_and_lengths_by_tenant() -> None:
    metrics = _metrics()
    for out in (_out("acme", drafted=12, accepted=6, steps=4),     # length 2.5
                _out("acme", drafted=8, accepted=8, steps=2),      # length 5
                _out("globex", drafted=9, accepted=0, steps=3)):   # length 1
        metrics.speculative.finished(out)
    assert _value(metrics, "herd_speculative_draft_tokens_total", tenant="acme") == 20
    assert _value(metrics, "herd_speculative_accepted_tokens_total", tenant="acme") == 14
    assert _value(metrics, "herd_speculative_draft_tokens_total", tenant="globex") == 9
    assert _value(metrics, "herd_speculative_accepted_tokens_total", tenant="globex") == 0
    assert _value(metrics, "herd_speculative_acceptance_length_count", tenant="acme") == 2
    assert _value(metrics, "herd_speculative_acceptance_length_sum", tenant="acme") == 7.5
    assert _value(metrics, "herd_speculative_acceptance_length_bucket", tenant="acme", le="2.5") == 1
    assert _value(metrics, "herd_speculative_acceptance_length_bucket", tenant="acme", le="4.0") == 1
    assert _value(metrics, "herd_speculative_acceptance_length_bucket", tenant="acme", le="5.0") == 2
    assert _value(metrics, "herd_speculative_acceptance_length_bucket", tenant="globex", le="1.0") == 1


def test_only_finished_choices_that_verified_drafts_are_observed() -> None:
    metrics = _metrics()
    metrics.speculative.finished(_out("acme", drafted=4, accepted=2, steps=2, finished=False))
    metrics.speculative.finished(_out("acme", drafted=0, accepted=0, steps=0))  # opted out, or nothing proposed
    assert _value(metrics, "herd_speculative_draft_tokens_total", tenant="acme") is None
    assert _value(metrics, "herd_speculative_acceptance_length_count", tenant="acme") is None
    metrics.speculative.finished(_out("acme", drafted=4, accepted=2, steps=2, index=1))  # a second choice counts too
    assert _value(metrics, "herd_speculative_acceptance_length_count", tenant="acme") == 1


def test_engine_totals_come_from_the_engine_stats_at_scrape_time() -> None:
    metrics = _metrics()
    assert _value(metrics, "herd_replica_speculative_draft_tokens_total") == 120
    assert _value(metrics, "herd_replica_speculative_accepted_tokens_total") == 75


def test_buckets_span_one_to_past_the_most_draft_tokens() -> None:
    from herd.engine.speculative.config import MAX_DRAFT_TOKENS

    assert ACCEPTANCE_BUCKETS[0] == 1 and ACCEPTANCE_BUCKETS[-1] >= MAX_DRAFT_TOKENS + 1
    assert list(ACCEPTANCE_BUCKETS) == sorted(set(ACCEPTANCE_BUCKETS))


def test_the_replica_records_each_finished_output_it_streams() -> None:
    """ReplicaCore's check of every engine output feeds the metrics (before an error output is raised)."""
    metrics = _metrics()
    replica = SimpleNamespace(metrics=metrics)
    span = trace.INVALID_SPAN
    ReplicaCore._check(replica, span, _out("acme", drafted=6, accepted=3, steps=3))  # type: ignore[arg-type]
    failed = dataclasses.replace(_out("acme", drafted=2, accepted=1, steps=1), finish_reason="error")
    with pytest.raises(Exception, match="engine step failed"):
        ReplicaCore._check(replica, span, failed)  # type: ignore[arg-type]
    assert _value(metrics, "herd_speculative_draft_tokens_total", tenant="acme") == 8
    assert _value(metrics, "herd_speculative_acceptance_length_count", tenant="acme") == 2
