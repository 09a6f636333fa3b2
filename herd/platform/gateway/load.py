"""Per-model load as the gateway sees it (every request passes here): requests and tokens in flight,
those still waiting for their first token, requests waiting for a replica of a model scaled to zero, time
to first token, inter-token latency, output tokens. The control plane reads it to decide replica counts."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ModelLoad:
    in_flight: int = 0  # admitted and not finished (running, queued at Serve, or held for a replica)
    in_flight_tokens: int = 0  # prompt + max_tokens of those: the KV they may come to hold
    waiting_for_replica: int = 0  # of in_flight: held because the model has no ready replica
    awaiting_first_token: int = 0  # of in_flight: no output token yet (held, queued, or in prefill)
    refused_cold: deque[float] = field(default_factory=deque)  # when one was refused for want of a replica
    ttfts: deque[tuple[float, float]] = field(default_factory=deque)  # (when, seconds)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (when, output tokens)
    itls: deque[tuple[float, float, int]] = field(default_factory=deque)  # (when, seconds per token, tokens)


class LoadTracker:
    """Rolling one-minute view per model."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.models: dict[str, ModelLoad] = {}

    def _model(self, model: str) -> ModelLoad:
        return self.models.setdefault(model, ModelLoad())

    def started(self, model: str, tokens: int = 0) -> None:
        load = self._model(model)
        load.in_flight += 1
        load.in_flight_tokens += tokens
        load.awaiting_first_token += 1

    def waiting(self, model: str, delta: int) -> None:
        """A request starts (+1) or stops (-1) waiting for a replica of a cold model."""
        self._model(model).waiting_for_replica += delta

    def refused_for_cold_start(self, model: str) -> None:
        self._model(model).refused_cold.append(time.monotonic())

    def first_token(self, model: str, ttft_s: float) -> None:
        now = time.monotonic()
        load = self._model(model)
        load.ttfts.append((now, ttft_s))
        load.awaiting_first_token -= 1
        self._prune(load, now)

    def output(self, model: str, tokens: int, since_last_s: float | None = None) -> None:
        """`tokens` output tokens arrived in one chunk, `since_last_s` after the request's chunk before (None: its
        first): that gap over the chunk's tokens is the inter-token latency of each (a replica batches tokens)."""
        if tokens:
            now = time.monotonic()
            load = self._model(model)
            load.tokens.append((now, tokens))
            if since_last_s is not None:
                load.itls.append((now, since_last_s / tokens, tokens))
            self._prune(load, now)

    def _prune(self, load: ModelLoad, now: float) -> None:
        """Drop samples older than the window (as they come, not only when read: a gateway nobody reads
        would otherwise keep every sample it ever took)."""
        for samples in (load.ttfts, load.tokens, load.itls):
            while samples and now - samples[0][0] > self.window_s:
                samples.popleft()
        while load.refused_cold and now - load.refused_cold[0] > self.window_s:
            load.refused_cold.popleft()

    def finished(self, model: str, tokens: int = 0, *, answered: bool = True) -> None:
        """A request ended; `answered`: it had its first token (first_token was called for it)."""
        load = self.models[model]
        load.in_flight -= 1
        load.in_flight_tokens -= tokens
        if not answered:
            load.awaiting_first_token -= 1

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """{model: {in_flight, in_flight_tokens, waiting_for_replica, awaiting_first_token, refused_cold,
        ttft_p95_s, itl_p95_s, output_tokens_per_s}}, the latencies, rates and refusals over the window (the ITL
        p95 over tokens, not chunks)."""
        now = time.monotonic()
        out: dict[str, dict[str, float | None]] = {}
        for name, load in self.models.items():
            self._prune(load, now)
            ttfts = sorted(t for _, t in load.ttfts)
            p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None
            out[name] = {"in_flight": load.in_flight, "in_flight_tokens": load.in_flight_tokens,
                         "waiting_for_replica": load.waiting_for_replica,
                         "awaiting_first_token": load.awaiting_first_token, "refused_cold": len(load.refused_cold),
                         "ttft_p95_s": p95, "itl_p95_s": _weighted_p95([(s, n) for _, s, n in load.itls]),
                         "output_tokens_per_s": sum(n for _, n in load.tokens) / self.window_s}
        return out


def _weighted_p95(samples: list[tuple[float, int]]) -> float | None:
    """The 95th percentile of values each counted `weight` times; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = 0.95 * sum(weight for _, weight in ordered)
    seen = 0
    for value, weight in ordered:
        seen += weight
        if seen > rank:
            return value
    return ordered[-1][0]
