"""The choices of one request (n > 1, best_of): one sequence per candidate, one prompt computed once.

Legend: B rows that sample this step, S sequences that sample (B plus the choices forked in the step).

Candidate 0 (the leader) carries the request's id and is the only one scheduled at first; the others wait in
its `forks`. The step that computes the last of the prompt samples every candidate's first token from the
leader's logits row (each with its own seed: a seeded request's candidate i draws from child_seed(seed, i)),
and right after that step the others are forked: their block tables name the leader's blocks (the KV cache
manager copies the one partial block a candidate writes into, copy-on-write) and they run on as sequences of
their own. An abort of the request ends every candidate. best_of ranks the finished candidates by the
cumulative log-probability of their tokens and reports the best n, renumbered 0..n-1 (Candidates).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

from herd.engine.kv_cache_manager import KVCacheManager
from herd.engine.outputs import RequestOutput
from herd.engine.sampling_params import MAX_SEED
from herd.engine.scheduler import Scheduler
from herd.engine.sequence import Sequence, Status


def candidate_id(request_id: str, index: int) -> str:
    """The engine's id for a request's candidate: the request's own for the first."""
    return request_id if index == 0 else f"{request_id}#{index}"


def child_seed(seed: int | None, index: int) -> int | None:
    """Candidate index's seed: the request's for the first, else a hash of (seed, index), so no two candidates
    draw the same uniforms and a seeded request still repeats exactly."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def candidate(leader: Sequence, index: int) -> Sequence:
    """Candidate `index` of the leader's request, before anything is computed: the same prompt and settings, its
    own id and seed, and lists of its own."""
    params = dataclasses.replace(leader.params, seed=child_seed(leader.params.seed, index))
    grammar = leader.grammar.copy() if leader.grammar is not None else None  # each choice its own constraint state
    return dataclasses.replace(leader, request_id=candidate_id(leader.request_id, index), index=index, params=params,
                               output_ids=[], forks=[], grammar=grammar)


def fan_out(sampling: list[Sequence]) -> tuple[list[Sequence], list[int] | None]:
    """The sequences that sample this step [S] and the logits row [B] each samples from: a leader's unforked
    candidates sample from its row, right after it. None for the rows when there are none (the common case)."""
    if not any(seq.forks for seq in sampling):
        return sampling, None
    seqs: list[Sequence] = []
    rows: list[int] = []
    for row, seq in enumerate(sampling):
        for member in (seq, *(child for child in seq.forks if not child.is_finished)):
            seqs.append(member)
            rows.append(row)
    return seqs, rows


def fork_computed(sampling: list[Sequence], kv: KVCacheManager, scheduler: Scheduler) -> None:
    """After the step that computed their leaders' prompts: fork the candidates still unfinished."""
    for seq in sampling:
        if seq.forks and seq.status is Status.RUNNING:
            for child in seq.forks:
                if not child.is_finished:
                    kv.fork(seq, child)
                    scheduler.adopt(child)
            seq.forks = []


@dataclass
class RequestGroups:
    """The candidates of every unfinished request that has more than one, by the request's id."""

    _members: dict[str, list[Sequence]] = field(default_factory=dict)
    _group_of: dict[str, str] = field(default_factory=dict)

    def add(self, members: list[Sequence]) -> None:
        if len(members) > 1:
            self._members[members[0].request_id] = members
            self._group_of.update((seq.request_id, members[0].request_id) for seq in members)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._members

    def members(self, request_id: str) -> list[Sequence]:
        """Every candidate of the request (empty for an unknown id or a request of one)."""
        return self._members.get(request_id, [])

    def forget(self, seq: Sequence) -> None:
        """seq has finished: drop its group once every candidate has."""
        group = self._group_of.get(seq.request_id)
        if group is not None and all(member.is_finished for member in self._members[group]):
            for member in self._members.pop(group):
                del self._group_of[member.request_id]


class Candidates:
    """best_of's pick: the finished outputs of a request's candidates, held until all are in, then the n with
    the highest cumulative log-probability (ties: the lower index), renumbered 0..n-1."""

    def __init__(self, total: int, n: int) -> None:
        self.total = total
        self.n = n
        self._finished: list[RequestOutput] = []

    def add(self, output: RequestOutput) -> list[RequestOutput]:
        """Take one candidate's finished output; the request's n choices once it was the last, else nothing."""
        self._finished.append(output)
        if len(self._finished) < self.total:
            return []
        ranked = sorted(self._finished, key=lambda out: (-_score(out), out.index))
        # Nothing was streamed before: each choice's one output carries all of it as new.
        return [dataclasses.replace(out, index=i, delta_token_ids=out.token_ids, delta_text=out.text)
                for i, out in enumerate(ranked[: self.n])]


def _score(output: RequestOutput) -> float:
    return output.cumulative_logprob if output.cumulative_logprob is not None else float("-inf")
