"""Prompt log-probabilities, read from the rows of the prefill that computes the prompt's KV (no second pass).

Legend: P prompt rows in the step, V vocab, N the most alternatives any of them asks for.

The row at position p of a sequence scores prompt token p + 1 (the model's log-softmax there, as the sampler
gives for output tokens), so of a prompt's T tokens the last T - 1 are scored; the first has nothing before it
(None). A sequence holds what has been scored so far (Sequence.prompt_logprobs, from [None]); a step asks only
for the positions after those, so a chunk recomputed after preemption is never scored twice, and the prefix
cache serves such a sequence only positions already scored (Sequence.cacheable_tokens). The plan is read when
the step is laid out, on the engine's thread; the scores are computed with the forward (on the model thread
under async scheduling) and recorded on the engine's thread, before the step's sampled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from herd.engine.sampler import TokenLogprobs
from herd.engine.scheduler import ScheduledChunk
from herd.engine.sequence import Sequence

_ROWS_PER_PASS = 256
"""Rows log-softmaxed at once: bounds the float32 [rows, V] a long prompt chunk needs besides its logits."""


@dataclass(frozen=True)
class PromptRows:
    """One chunk's rows that score prompt tokens: step rows [row, row + len(targets)) score `targets`, the
    prompt's tokens from index `first`, each with `top` alternatives."""

    seq: Sequence
    row: int
    first: int
    targets: tuple[int, ...]
    top: int


@dataclass(frozen=True)
class ScoredPrompt:
    """What a step computed for one PromptRows: one TokenLogprobs per target, in order."""

    rows: PromptRows
    entries: list[TokenLogprobs]


def plan(chunks: Seq[ScheduledChunk]) -> list[PromptRows]:
    """The step's rows (chunks laid end to end, as the model runner lays them) that score prompt tokens not
    scored yet, for the sequences that ask for them."""
    out: list[PromptRows] = []
    row = 0
    for chunk in chunks:
        seq, scored = chunk.seq, chunk.seq.prompt_logprobs
        if scored is not None and seq.params.prompt_logprobs is not None:
            start = max(chunk.start, len(scored) - 1)  # the first position whose token is not scored yet
            end = min(chunk.start + chunk.num_tokens, len(seq.prompt_ids) - 1)
            if start < end:
                out.append(PromptRows(seq, row + start - chunk.start, start + 1,
                                      tuple(seq.prompt_ids[start + 1 : end + 1]), seq.params.prompt_logprobs))
        row += chunk.num_tokens
    return out


def rows(planned: Seq[PromptRows]) -> list[int]:
    """The step rows [P] whose logits the plan reads, in plan order."""
    return [row for p in planned for row in range(p.row, p.row + len(p.targets))]


def score(planned: Seq[PromptRows], logits: torch.Tensor) -> list[ScoredPrompt]:
    """Float32 logits [P, V] of rows(planned) -> each PromptRows' TokenLogprobs, from one copy to the host per
    pass of _ROWS_PER_PASS rows."""
    targets = torch.tensor([t for p in planned for t in p.targets], dtype=torch.int64, device=logits.device)  # [P]
    width = max((p.top for p in planned), default=0)
    lines: list[list[float]] = []
    for begin in range(0, logits.shape[0], _ROWS_PER_PASS):
        logprobs = torch.log_softmax(logits[begin : begin + _ROWS_PER_PASS], dim=-1)  # [p, V]
        chosen = logprobs.gather(1, targets[begin : begin + _ROWS_PER_PASS, None])  # [p, 1]
        top_values, top_ids = torch.topk(logprobs, width)  # [p, N] each
        # float32 values and ids below 2**53 are exact in float64, so one table carries both.
        lines += torch.cat([chosen.double(), top_values.double(), top_ids.double()], dim=1).tolist()  # [p, 1 + 2N]
    out, at = [], 0
    for p in planned:
        entries = [TokenLogprobs(token_id=token, logprob=line[0],
                                 top=tuple((int(line[1 + width + i]), line[1 + i]) for i in range(p.top)))
                   for token, line in zip(p.targets, lines[at : at + len(p.targets)], strict=True)]
        out.append(ScoredPrompt(p, entries))
        at += len(p.targets)
    return out


def record(scored: Seq[ScoredPrompt]) -> None:
    """On the engine's thread: append each sequence's new scores (only where they continue what it holds)."""
    for item in scored:
        held = item.rows.seq.prompt_logprobs
        if held is not None and len(held) == item.rows.first:
            held += item.entries


def delivered(seq: Sequence) -> list[TokenLogprobs | None] | None:
    """The prompt logprobs to report with a sequence's first token (a copy; None when not asked)."""
    held = seq.prompt_logprobs
    return list(held) if held is not None and len(seq.output_ids) == 1 else None
