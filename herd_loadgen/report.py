"""The report: markdown rows of a run's summary, and a plot of throughput and TTFT against concurrency."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from herd_loadgen.results import LoadResult

COLUMNS = ("system", "concurrency", "requests", "errors", "output tok/s", "TTFT p50 ms", "TTFT p95 ms",
           "TTFT p99 ms", "ITL p50 ms", "ITL p95 ms", "ITL p99 ms")
_KEYS = ("output_tok_per_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms")


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * (len(COLUMNS) - 1)


def table_row(system: str, summary: Mapping[str, Any]) -> str:
    """One markdown row of `LoadResult.summary()` (missing or None values print as '-')."""
    cells = [system, str(summary.get("concurrency", "-")), str(summary.get("requests", "-")),
             str(summary.get("errors", "-"))]
    cells += ["-" if summary.get(key) is None else f"{summary[key]:.1f}" for key in _KEYS]
    return "| " + " | ".join(cells) + " |"


def plot(
    results_by_system: Mapping[str, Mapping[int, LoadResult]],
    path: str | Path,
    *,
    ceilings: Mapping[str, float] | None = None,
) -> Path:
    """PNG of output tok/s and p50/p95 TTFT against concurrency, one line per system; `ceilings` (tok/s)
    are drawn as horizontal lines on the throughput panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    throughput, ttft = fig.subplots(1, 2)
    levels: set[int] = set()
    ttft_seen = False
    for i, (system, by_level) in enumerate(results_by_system.items()):
        xs = sorted(by_level)
        levels.update(xs)
        summaries = [by_level[c].summary() for c in xs]
        throughput.plot(xs, [s["output_tok_per_s"] for s in summaries], marker="o", color=f"C{i}", label=system)
        for q, style in ((50, "-"), (95, "--")):
            values = [math.nan if s[f"ttft_p{q}_ms"] is None else s[f"ttft_p{q}_ms"] for s in summaries]
            ttft_seen = ttft_seen or any(v > 0 for v in values)  # nan > 0 is False
            ttft.plot(xs, values, marker="o", linestyle=style, color=f"C{i}", label=f"{system} p{q}")
    for j, (name, value) in enumerate((ceilings or {}).items()):
        throughput.axhline(value, linestyle=":", color=f"C{len(results_by_system) + j}", label=name)
    # A log axis needs one positive value: a run whose every request failed has none (all-NaN TTFT, zero tok/s).
    ttft_unit = "TTFT ms (log)" if ttft_seen else "TTFT ms (none measured)"
    for ax, title, unit in ((throughput, "Output throughput", "output tokens / s"),
                            (ttft, "Time to first token", ttft_unit)):
        if levels:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if ttft_seen:
        ttft.set_yscale("log")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out

