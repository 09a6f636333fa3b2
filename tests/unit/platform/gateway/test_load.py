"""The gateway's rolling load view: what it reports, and that it keeps only its window's samples."""

from __future__ import annotations

from herd.platform.gateway import load as load_module
from herd.platform.gateway.load import LoadTracker


def test_samples_older_than_the_window_are_dropped_as_they_come(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(load_module.time, "monotonic", lambda: clock[0])
    tracker = LoadTracker(window_s=60)
    for _ in range(10_000):  # a gateway nobody reads (no control plane): it must not keep them all
        tracker.started("scout", 10)
        tracker.first_token("scout", 0.2)
        tracker.output("scout", 3)
        tracker.finished("scout", 10)
        clock[0] += 1.0
    model = tracker.models["scout"]
    assert len(model.ttfts) <= 61 and len(model.tokens) <= 61
    snapshot = tracker.snapshot()["scout"]
    assert snapshot["in_flight"] == 0 and snapshot["in_flight_tokens"] == 0
    assert snapshot["ttft_p95_s"] == 0.2
    assert snapshot["output_tokens_per_s"] == sum(n for _, n in model.tokens) / 60


def test_requests_awaiting_their_first_token_and_the_inter_token_latency_p95_over_tokens(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(load_module.time, "monotonic", lambda: clock[0])
    tracker = LoadTracker(window_s=60)
    for _ in range(3):
        tracker.started("scout", 10)
    tracker.first_token("scout", 0.5)
    tracker.output("scout", 1)  # the first chunk: no gap before it
    tracker.finished("scout", 10, answered=False)  # refused before any token
    snapshot = tracker.snapshot()["scout"]
    assert (snapshot["in_flight"], snapshot["awaiting_first_token"]) == (2, 1)
    assert snapshot["itl_p95_s"] is None, "no gap yet"
    tracker.output("scout", 90, since_last_s=0.9)  # a batched chunk: 90 tokens 10 ms apart
    tracker.output("scout", 10, since_last_s=1.0)  # 10 tokens 100 ms apart: 10 % of the tokens
    assert tracker.snapshot()["scout"]["itl_p95_s"] == 0.1, "weighted by tokens, not by chunks"
    tracker.output("scout", 200, since_last_s=2.0)
    assert tracker.snapshot()["scout"]["itl_p95_s"] == 0.01
    clock[0] += 61
    assert tracker.snapshot()["scout"]["itl_p95_s"] is None, "out of the window"
