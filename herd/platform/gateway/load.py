"""Per-model load as the gateway sees it (every request passes here): requests in flight, time to first
token, output tokens. The control plane reads it to decide replica counts."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ModelLoad:
    in_flight: int = 0
    ttfts: deque[tuple[float, float]] = field(default_factory=deque)  # (when, seconds)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (when, output tokens)


class LoadTracker:
    """Rolling one-minute view per model."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.models: dict[str, ModelLoad] = {}

    def started(self, model: str) -> None:
        self.models.setdefault(model, ModelLoad()).in_flight += 1

    def first_token(self, model: str, ttft_s: float) -> None:
        self.models.setdefault(model, ModelLoad()).ttfts.append((time.monotonic(), ttft_s))

    def output(self, model: str, tokens: int) -> None:
        if tokens:
            self.models.setdefault(model, ModelLoad()).tokens.append((time.monotonic(), tokens))

    def finished(self, model: str) -> None:
        self.models[model].in_flight -= 1

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """{model: {in_flight, ttft_p95_s, output_tokens_per_s}} over the window."""
        now = time.monotonic()
        out = {}
        for name, load in self.models.items():
            for samples in (load.ttfts, load.tokens):
                while samples and now - samples[0][0] > self.window_s:
                    samples.popleft()
            ttfts = sorted(t for _, t in load.ttfts)
            p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None
            out[name] = {"in_flight": load.in_flight, "ttft_p95_s": p95,
                         "output_tokens_per_s": sum(n for _, n in load.tokens) / self.window_s}
        return out
