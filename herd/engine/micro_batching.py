"""How a step's chunks are split into micro-batches for ping-pong (herd.model.micro_batch): a pure decision.

Groups are runs of consecutive chunks, so the sampled rows of the micro-batches, one after another, are the step's
in its own order; each run takes about an equal share of the step's tokens (the attention and expert work of a
micro-batch grows with them), and none is empty.
"""

from __future__ import annotations

from collections.abc import Sequence


def split_chunks(tokens: Sequence[int], parts: int) -> list[range]:
    """Split chunks of these token counts into at most `parts` runs of about equal tokens: each run's chunk
    indexes, in order. Fewer runs when there are fewer chunks; one run when parts is 1."""
    if parts < 1:
        raise ValueError(f"micro-batches must be at least 1, got {parts}")
    count = len(tokens)
    parts = min(parts, count)
    if parts <= 1:
        return [range(count)] if count else []
    total = sum(tokens)
    runs: list[range] = []
    start, seen = 0, 0
    for index, size in enumerate(tokens):
        seen += size
        left_chunks, left_runs = count - index - 1, parts - len(runs) - 1
        # close a run once it holds its share, keeping a chunk for every run still to come
        if left_runs and (seen * parts >= total * (len(runs) + 1) or left_chunks == left_runs):
            runs.append(range(start, index + 1))
            start = index + 1
    runs.append(range(start, count))
    return runs
