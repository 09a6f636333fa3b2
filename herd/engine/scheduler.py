"""The scheduler: which sequences compute how many tokens in the next step.

There is no prefill phase and no decode phase. Every sequence has known tokens (prompt + output) and
computed tokens (with KV entries); a step gives each chosen sequence up to the difference, within a
token budget. A long prompt is therefore prefilled in chunks beside other sequences' decodes, and a
preempted sequence simply starts again from what the prefix cache still holds.

Order: tenants by weighted fair share (least-served first, by tokens), within a tenant its running
sequences then its waiting ones, each in arrival order. When blocks run out, the running sequence of
the most-served tenant, newest first, is preempted (its blocks freed, recomputed later).
Pure bookkeeping: no torch; the KV cache manager answers every question about blocks.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from herd.engine.fair_share import FairShare
from herd.engine.kv_cache_manager import CachedBlock, KVCacheManager
from herd.engine.sequence import Sequence, Status


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one step."""

    max_num_seqs: int = 64
    """Sequences holding KV blocks at once."""
    max_num_batched_tokens: int = 512
    """Tokens computed per step, prefill chunks and decodes together."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute positions [start, start + num_tokens) of seq in this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool
    """The chunk reaches the end of the known tokens, so the step samples the next one."""
    drafts: tuple[int, ...] = ()
    """Draft tokens the chunk verifies after the known ones (the last len(drafts) of its positions): the step
    samples at each of them as well, and keeps them as far as the model agrees."""

    @property
    def num_known(self) -> int:
        """The chunk's positions that hold known tokens (the rest are drafts)."""
        return self.num_tokens - len(self.drafts)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Waiting queues per tenant, the running set, and the fair-share clock."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.fair = FairShare()
        self.waiting: dict[str, deque[Sequence]] = {}
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.admissible: Callable[[Sequence], bool] | None = None
        """Asked before a waiting sequence is admitted (after the sequence-count check): False leaves it, and its
        tenant's later waiting ones, for a later step (the engine: its LoRA adapter cannot be made resident)."""

    def add(self, seq: Sequence) -> None:
        if seq.tenant_id not in self._busy_tenants():
            self.fair.activate(seq.tenant_id, self._busy_tenants())
        self.waiting.setdefault(seq.tenant_id, deque()).append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting.values())

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort): its blocks go back to the pool at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.kv.free(seq)
        elif seq.status is Status.WAITING and seq in self.waiting.get(seq.tenant_id, ()):
            self.waiting[seq.tenant_id].remove(seq)  # (a choice not yet forked was never queued)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_ns = time.time_ns()

    def adopt(self, child: Sequence) -> None:
        """A sequence forked from a running one (its blocks shared by the KV cache manager) runs from now on."""
        self.running.append(child)
        child.status = Status.RUNNING
        child.scheduled_ns = time.time_ns()

    def on_step_done(self, output: SchedulerOutput) -> list[CachedBlock]:
        """The step computed what was scheduled: advance, cache full blocks, drop passed chunks. A chunk's drafts
        are not counted: accept_drafts counts those the model agreed with, once they are output. The blocks it
        registered in the prefix cache (KVCacheManager.on_computed)."""
        registered: list[CachedBlock] = []
        for chunk in output.chunks:
            chunk.seq.num_computed += chunk.num_known
            registered += self.kv.on_computed(chunk.seq)
        return registered

    def accept_drafts(self, seq: Sequence, accepted: int) -> None:
        """The first `accepted` drafts of seq's last verifying step are now output tokens: their KV entries count
        as computed (and cached); the blocks taken for the rejected ones go back."""
        seq.num_computed += accepted
        self.kv.on_computed(seq)
        self.kv.trim(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        candidates = {t: self._candidates(t) for t in self._busy_tenants()}
        heads = {t: next(it, None) for t, it in candidates.items()}
        heap = [(self.fair.virtual_time(t), s.arrival, t) for t, s in heads.items() if s is not None]
        heapq.heapify(heap)
        scheduled: set[int] = set()
        while budget > 0 and heap:
            _, _, tenant = heapq.heappop(heap)
            while True:  # this tenant's sequences, for as long as it would be popped next anyway
                seq = heads[tenant]
                heads[tenant] = next(candidates[tenant], None)
                assert seq is not None
                num = self._try_schedule(seq, budget, scheduled, out)
                if num is None:
                    if seq.status is Status.WAITING:
                        heads[tenant] = None  # no room to admit: its later waiting ones would not fit either
                    break
                budget -= num
                self.fair.charge(tenant, num, seq.tenant_weight)
                nxt = heads[tenant]
                if nxt is None:
                    break
                key = (self.fair.virtual_time(tenant), nxt.arrival, tenant)
                if budget <= 0 or (heap and heap[0] < key):
                    heapq.heappush(heap, key)
                    break
        return out

    def _try_schedule(self, seq: Sequence, budget: int, scheduled: set[int], out: SchedulerOutput) -> int | None:
        """Schedule seq for as many tokens as fit, preempting if blocks are short; None if it cannot run."""
        admitting = seq.status is Status.WAITING
        if admitting:
            slots = len(self.running) + sum(len(s.forks) for s in self.running)  # choices to be forked hold theirs
            if slots + 1 + len(seq.forks) > self.config.max_num_seqs:
                return None
            if self.admissible is not None and not self.admissible(seq):
                return None
            self.kv.admit(seq)
        drafts = seq.draft_ids if seq.num_computed == seq.num_known - 1 else ()  # only a decode verifies drafts
        num = min(seq.num_known + len(drafts) - seq.num_computed, budget)
        while not self.kv.allocate(seq, num):
            if num > seq.num_known - seq.num_computed:  # drop the drafts before preempting anyone for them
                num = seq.num_known - seq.num_computed
                continue
            victim = self._victim(exclude=scheduled | {id(seq)})
            if victim is None:
                if admitting:
                    self.kv.cancel_admit(seq)  # give back the prefix blocks admit took; it is looked up again
                else:
                    self._preempt(seq, out)
                return None
            self._preempt(victim, out)
        if admitting:
            self.waiting[seq.tenant_id].remove(seq)
            self.running.append(seq)
            seq.status = Status.RUNNING
            seq.scheduled_ns = seq.scheduled_ns or time.time_ns()
        scheduled.add(id(seq))
        verified = tuple(drafts[: seq.num_computed + num - seq.num_known]) if drafts else ()
        out.chunks.append(ScheduledChunk(seq, seq.num_computed, num, seq.num_computed + num >= seq.num_known,
                                         verified))
        return num

    def _candidates(self, tenant: str) -> Iterator[Sequence]:
        """This tenant's sequences in the order it is served: running, then waiting, by arrival."""
        running = [s for s in self.running if s.tenant_id == tenant]
        waiting = list(self.waiting.get(tenant, ()))
        for seq in running:
            if seq.status is Status.RUNNING and not seq.ends_in_flight:  # not preempted earlier in this step
                yield seq
        for seq in waiting:
            if seq.status is Status.WAITING and seq.num_computed == 0:
                yield seq

    def _victim(self, exclude: set[int]) -> Sequence | None:
        """The running sequence to preempt: the most-served tenant's newest, not yet in this step."""
        pool = [s for s in self.running if id(s) not in exclude]
        if not pool:
            return None
        return max(pool, key=lambda s: (self.fair.virtual_time(s.tenant_id), s.arrival))

    def recompute(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Send a running sequence back to wait, its blocks given back, to be computed again from its tokens (its KV
        is not to be trusted), and drop it from `out`, a schedule made before."""
        out.chunks = [chunk for chunk in out.chunks if chunk.seq is not seq]
        self._preempt(seq, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.setdefault(seq.tenant_id, deque()).appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _busy_tenants(self) -> set[str]:
        return {s.tenant_id for s in self.running} | {t for t, q in self.waiting.items() if q}
