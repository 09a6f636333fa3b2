"""Verifying draft tokens: every row of a verifying chunk is sampled from the target model as if the drafts before
it had been output, and the drafts are kept while they equal those samples; the first sample that differs (or the
one after the last draft) is output too.

Legend: S sequences that sample this step, R rows (one per sequence, plus one per draft token it verifies).

Why this is exact. Drafts here are deterministic (prompt lookup; a greedy draft head): a proposal q with all its
mass on the draft d. The rejection-sampling rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023)
accepts d with probability min(1, p(d) / q(d)) = p(d) and on a rejection samples the residual max(0, p - q),
normalised: p without d. Sampling t ~ p and accepting d iff t = d does the same: P(accept) = p(d), and a rejected
t is p conditioned on t != d. So every output token is drawn from the target's distribution given the tokens before
it, after the same penalties, bias, top-k/top-p/min-p and grammar mask as without drafts (at temperature 0: its
argmax). A seeded request's row for output position i draws the same (seed, i) uniform as without speculation, so
it outputs the very same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from itertools import accumulate

from herd.engine.penalties import History, needs_history
from herd.engine.sampling_params import SamplingParams
from herd.engine.scheduler import ScheduledChunk
from herd.engine.sequence import Sequence


@dataclass(frozen=True)
class VerifyRows:
    """A step's sampling rows expanded over drafts: row starts[s] + j samples sequence s's output position
    len(output) + j, as if its drafts[:j] had been output."""

    logit_rows: list[int]
    """The step's logits row [R] of each expanded row."""
    params: list[SamplingParams]
    positions: list[int]
    histories: list[History | None]
    starts: list[int]
    """Each sequence's first row [S]."""
    drafts: list[tuple[int, ...]]
    """Each sequence's drafts verified in the step [S] (empty: one row, an ordinary sample)."""


def verify_rows(chunks: Seq[ScheduledChunk], sampling: Seq[Sequence], rows: Seq[int] | None) -> VerifyRows | None:
    """A step's rows expanded over the drafts its chunks verify (None when no chunk verifies any). `sampling` and
    `rows` are the step's sampling sequences and the sampling chunk each samples from (herd.engine.request_group's
    fan_out; None: one each, in order); a fork that samples its first token from its leader's row verifies nothing."""
    samplers = [c for c in chunks if c.samples]
    if not any(c.drafts for c in samplers):
        return None
    firsts = list(accumulate((1 + len(c.drafts) for c in samplers), initial=0))
    by_row = rows if rows is not None else range(len(samplers))
    drafts = [samplers[r].drafts if seq is samplers[r].seq else () for seq, r in zip(sampling, by_row, strict=True)]
    return expand(sampling, drafts, [firsts[r] for r in by_row])


def expand(sampling: Seq[Sequence], drafts: Seq[tuple[int, ...]], chunk_rows: Seq[int]) -> VerifyRows:
    """The expanded rows of the step's sampling sequences, given each one's drafts and its first logits row (a
    chunk verifying d drafts has 1 + d rows, from its last known token's)."""
    logit_rows: list[int] = []
    params: list[SamplingParams] = []
    positions: list[int] = []
    histories: list[History | None] = []
    starts: list[int] = []
    for seq, verified, first in zip(sampling, drafts, chunk_rows, strict=True):
        starts.append(len(logit_rows))
        history = needs_history(seq.params)
        for j in range(len(verified) + 1):
            logit_rows.append(first + j)
            params.append(seq.params)
            positions.append(seq.draw_position + j)
            histories.append(History(seq.prompt_ids, (*seq.output_ids, *verified[:j]), seq.stop_ids, seq.bad_words)
                             if history else None)
    return VerifyRows(logit_rows, params, positions, histories, starts, list(drafts))


def accepted_count(drafts: Seq[int], sampled: Seq[int]) -> int:
    """How many leading drafts the target's samples [len(drafts) + 1] agree with: the tokens output are
    sampled[: that + 1]."""
    count = 0
    for draft, token in zip(drafts, sampled, strict=False):
        if draft != token:
            break
        count += 1
    return count
