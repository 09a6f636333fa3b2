"""Several trunks' rows of one shard's layer step as one batch, and the outputs back to each (issue 28's M:N).

Legend: M trunks, E' the shard's experts, R_t trunk t's rows (grouped by expert in the shard's order), R = sum R_t.

A shard serving M trunks computes their rows in one ShardExperts.compute: bigger expert GEMMs are the point of M:N.
The batch keeps each expert's rows contiguous, as compute expects: expert e's rows are trunk 0's, then trunk 1's,
and so on. Outputs come back per row, so splitting the batch's outputs the same way gives each trunk its own rows'
outputs in its own order. Moves only (cat and slice copies), no arithmetic: what changes with aggregation is only how
many rows each expert GEMM has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merged_counts(counts: Sequence[Sequence[int]]) -> list[int]:
    """Each expert's rows over all trunks: counts [M][E'] -> [E']."""
    return [sum(column) for column in zip(*counts, strict=True)]


def _pieces(counts: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """(trunk, start, stop) of each piece of the batch in order: expert-major, trunk-minor."""
    starts = [[0] for _ in counts]
    for trunk, row in enumerate(counts):
        for count in row:
            starts[trunk].append(starts[trunk][-1] + count)
    experts = len(counts[0]) if counts else 0
    return [(t, starts[t][e], starts[t][e + 1]) for e in range(experts) for t in range(len(counts))
            if starts[t][e + 1] > starts[t][e]]


def merge(counts: Sequence[Sequence[int]], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The batch of every trunk's rows: parts [M] of [R_t, ...] -> [R, ...], each expert's rows contiguous. Works for
    row slots ([R_t]) as for rows."""
    pieces = _pieces(counts)
    if not pieces:
        return parts[0][:0]
    return torch.cat([parts[t][a:b] for t, a, b in pieces])


def split(counts: Sequence[Sequence[int]], merged: torch.Tensor) -> list[torch.Tensor]:
    """Each trunk's outputs in its own rows' order: the batch's outputs [R, ...] -> [M] of [R_t, ...]."""
    out = [merged.new_empty((sum(row), *merged.shape[1:])) for row in counts]
    at = 0
    for t, a, b in _pieces(counts):
        out[t][a:b] = merged[at : at + b - a]
        at += b - a
    return out
