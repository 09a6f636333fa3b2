"""What a load run measured: one record per request, the run's summary, and the percentile they use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class RequestRecord:
    """What one request did, on the client's clock (seconds since the run started)."""

    index: int
    """The request's index in the workload."""
    start_s: float
    """When it was sent."""
    end_s: float = 0.0
    """When its stream ended or it failed."""
    ttft_s: float | None = None
    """Send to first non-empty content delta; None if none came."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between consecutive content chunks."""
    output_tokens: int = 0
    """From the server's usage if it sent one, else the number of content chunks."""
    status: int | None = None
    """HTTP status; None if no response came."""
    error: str | None = None
    """Why it failed; None if it succeeded."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(kw_only=True)
class LoadResult:
    """One run of a workload at one concurrency."""

    concurrency: int
    """Clients sending at once."""
    wall_s: float
    """First send to last completion."""
    records: list[RequestRecord]
    """One per request, in workload order."""
    max_in_flight: int
    """Most requests the client had open at once."""

    def summary(self) -> dict[str, Any]:
        """Counts, output tokens/s, and TTFT and ITL percentiles in ms (None where nothing was measured)."""
        ok = [r for r in self.records if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        itl = [gap for r in ok for gap in r.itl_s]
        out: dict[str, Any] = {
            "concurrency": self.concurrency, "requests": len(self.records), "errors": len(self.records) - len(ok),
            "output_tokens": tokens, "wall_s": self.wall_s,
            "output_tok_per_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
        }
        for name, values in (("ttft", ttft), ("itl", itl)):
            for q in (50, 95, 99):
                value = percentile(values, q)
                out[f"{name}_p{q}_ms"] = None if value is None else value * 1e3
        return out

    def errors(self) -> list[str]:
        return [f"request {r.index}: {r.error}" for r in self.records if r.error is not None]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
