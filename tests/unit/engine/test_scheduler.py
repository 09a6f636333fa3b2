"""The scheduler, simulated step by step without a model."""

from __future__ import annotations

import heapq
import random

import pytest

from herd.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tests.unit.engine.fakes import BLOCK, Status, all_blocks_free, kv_manager, scheduler, seq, simulate_step


def test_long_prompt_is_prefilled_in_chunks_beside_decodes():
    s = scheduler(budget=16)
    short = seq("short", 3, max_tokens=10)
    s.add(short)
    simulate_step(s)  # short prefilled, first token sampled
    long = seq("long", 40, max_tokens=2)
    s.add(long)
    out = simulate_step(s)
    sizes = {c.seq.request_id: c.num_tokens for c in out.chunks}
    assert sizes == {"short": 1, "long": 15}, "a decode and a prefill chunk share the step's budget"
    out = simulate_step(s)
    assert {c.seq.request_id: c.num_tokens for c in out.chunks} == {"short": 1, "long": 15}
    assert not [c for c in out.chunks if c.seq is long and c.samples]
    out = simulate_step(s)
    assert [(c.num_tokens, c.samples) for c in out.chunks if c.seq is long] == [(10, True)]


def test_max_num_seqs_limits_admission_and_fifo_within_a_tenant():
    s = scheduler(max_num_seqs=2)
    for i in range(4):
        s.add(seq(f"r{i}", 4, max_tokens=2))
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["r0", "r1"]


def test_preemption_frees_blocks_and_the_victim_recomputes_later():
    # 6 global blocks of 4 tokens: two 8-token prompts fit, their growth does not.
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv_manager(full=6, chunked=64,
                                                                                         prefix_caching=False))
    a, b = seq("a", 8, max_tokens=9), seq("b", 8, max_tokens=9, first_token=50)
    s.add(a)
    s.add(b)
    preempted = []
    for _ in range(60):
        if not s.has_work():
            break
        preempted += simulate_step(s).preempted
    assert not s.has_work()
    assert a.finish_reason == b.finish_reason == "length"
    assert len(a.output_ids) == len(b.output_ids) == 9
    assert preempted, "the pool was too small for both: someone had to be preempted"
    assert all_blocks_free(s)


def test_finish_and_abort_return_every_block():
    s = scheduler()
    seqs = [seq(f"r{i}", 5 + 3 * i, max_tokens=3) for i in range(5)]
    for q in seqs:
        s.add(q)
    simulate_step(s)
    s.finish(seqs[0], "abort")
    s.finish(seqs[4], "abort")
    while s.has_work():
        simulate_step(s)
    assert all(q.status is Status.FINISHED for q in seqs)
    assert all_blocks_free(s)


def test_fair_share_serves_a_light_tenant_within_a_bounded_number_of_steps():
    """Tenant A floods with long prompts; B's requests start at once, not behind A's queue."""
    s = scheduler(max_num_seqs=16, budget=64)
    for i in range(40):
        s.add(seq(f"a{i}", 100, max_tokens=8, tenant="A", first_token=1000 * i))
    for _ in range(3):
        simulate_step(s)
    b_requests = [seq(f"b{i}", 20, max_tokens=4, tenant="B", first_token=500 + i) for i in range(2)]
    for b in b_requests:
        s.add(b)
    first_step = {}
    for step in range(1, 200):
        out = simulate_step(s)
        for c in out.chunks:
            first_step.setdefault(c.seq.request_id, step)
        if all(b.is_finished for b in b_requests):
            break
    assert first_step["b0"] <= 1 and first_step["b1"] <= 2, first_step
    assert all(b.is_finished for b in b_requests)
    # Without fair share B would wait behind 40 prompts of 100 tokens at 64 tokens a step (> 60 steps).


def test_weights_split_the_budget_by_tokens():
    s = scheduler(max_num_seqs=64, budget=30)
    for i in range(20):
        s.add(seq(f"h{i}", 50, max_tokens=1, tenant="heavy", weight=2.0, first_token=1000 * i))
        s.add(seq(f"l{i}", 50, max_tokens=1, tenant="light", weight=1.0, first_token=500 + 1000 * i))
    served = {"heavy": 0, "light": 0}
    for _ in range(30):
        for c in simulate_step(s).chunks:
            served[c.seq.tenant_id] += c.num_tokens
    assert served["heavy"] / served["light"] == pytest.approx(2.0, abs=0.4), served


class _OnePerPop(Scheduler):
    """The scheduling loop as first written: one heap pop and push per scheduled sequence (the reference)."""

    def schedule(self):
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        candidates = {t: self._candidates(t) for t in self._busy_tenants()}
        heads = {t: next(it, None) for t, it in candidates.items()}
        heap = [(self.fair.virtual_time(t), s.arrival, t) for t, s in heads.items() if s is not None]
        heapq.heapify(heap)
        scheduled = set()
        while budget > 0 and heap:
            _, _, tenant = heapq.heappop(heap)
            s = heads[tenant]
            heads[tenant] = next(candidates[tenant], None)
            num = self._try_schedule(s, budget, scheduled, out)
            if num is None:
                if s.status is Status.WAITING:
                    heads[tenant] = None
                continue
            budget -= num
            self.fair.charge(tenant, num, s.tenant_weight)
            nxt = heads[tenant]
            if nxt is not None:
                heapq.heappush(heap, (self.fair.virtual_time(tenant), nxt.arrival, tenant))
        return out


def _held_blocks_are_contiguous(s: Scheduler) -> bool:
    """What KVCacheManager._missing relies on: every running sequence holds a block at each index from the
    window start of its computed tokens to the end of its table."""
    for sq in s.running:
        for group in s.kv.pools:
            table = s.kv.table(sq, group)
            first = s.kv.window_start(group, sq.num_computed) // BLOCK
            if any(block is None for block in table[first:]):
                return False
    return True


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_tenant_keeps_the_turn_as_one_pop_per_sequence_would_give_it(seed):
    def run(cls):
        rng = random.Random(seed)
        s = cls(SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=40), kv_manager(full=16, chunked=16))
        trace = []
        for step in range(80):
            if step < 30 and rng.random() < 0.6:
                tenant = rng.choice("abcd")
                s.add(seq(f"{step}", rng.randrange(1, 30), max_tokens=rng.randrange(1, 12), tenant=tenant,
                          weight={"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0}[tenant], first_token=rng.randrange(3)))
            out = simulate_step(s)
            assert _held_blocks_are_contiguous(s)
            trace.append(([(c.seq.request_id, c.start, c.num_tokens, c.samples) for c in out.chunks],
                          [p.request_id for p in out.preempted]))
        assert not s.has_work() and all_blocks_free(s)
        return trace, s.num_preemptions

    batched, preemptions = run(Scheduler)
    assert (batched, preemptions) == run(_OnePerPop)
    assert preemptions > 0 and any(len(chunks) >= 4 for chunks, _ in batched)


def test_a_request_of_several_choices_is_admitted_only_with_a_slot_for_each():
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv_manager())
    leader = seq("n3", 5)
    leader.forks = [seq("n3#1", 5), seq("n3#2", 5)]
    other, late = seq("other", 5), seq("late", 5)
    s.add(other)
    s.add(leader)
    s.add(late)
    out = s.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["other", "n3"], "3 + 1 slots: late waits for the forks' slots"
    s.on_step_done(out)
    crowded = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64), kv_manager())
    crowded.add(seq("first", 5))
    crowded.add(leader_of_three := seq("m3", 5))
    leader_of_three.forks = [seq("m3#1", 5), seq("m3#2", 5)]
    assert [c.seq.request_id for c in crowded.schedule().chunks] == ["first"]


def _decoding(s, rid, prompt_len, *, first_token=1):
    """A sequence admitted, prefilled and given its first token: its next step is a decode."""
    sq = seq(rid, prompt_len, max_tokens=40, first_token=first_token)
    s.add(sq)
    out = s.schedule()
    s.on_step_done(out)
    sq.output_ids.append(7)
    return sq


def test_a_decoding_sequence_verifies_its_drafts_and_a_prefilling_one_has_none():
    s = scheduler(budget=64)
    a = _decoding(s, "a", 6)
    a.draft_ids = [3, 4, 5]
    b = seq("b", 10, first_token=60)
    b.draft_ids = [9, 9]  # stale: a prefill verifies nothing
    s.add(b)
    chunks = {c.seq.request_id: c for c in s.schedule().chunks}
    a_chunk = chunks["a"]
    assert (a_chunk.start, a_chunk.num_tokens, a_chunk.drafts, a_chunk.samples) == (6, 4, (3, 4, 5), True)
    assert chunks["a"].num_known == 1
    assert (chunks["b"].num_tokens, chunks["b"].drafts) == (10, ())


def test_the_budget_cuts_drafts_and_short_blocks_drop_them_before_anyone_is_preempted():
    s = scheduler(budget=3)
    a = _decoding(s, "a", 2)
    a.draft_ids = [3, 4, 5, 6]
    [chunk] = s.schedule().chunks
    assert (chunk.num_tokens, chunk.drafts) == (3, (3, 4))
    # 2 global blocks of 4: a decode at position 7 fits in block 1, its drafts would need block 2.
    tight = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv_manager(full=2, chunked=64))
    b = _decoding(tight, "b", 7)
    b.draft_ids = [3, 4, 5]
    out = tight.schedule()
    assert [(c.num_tokens, c.drafts) for c in out.chunks] == [(1, ())]
    assert not out.preempted


def test_accepted_drafts_count_as_computed_and_the_rejected_ones_blocks_go_back():
    s = scheduler(budget=64)
    a = _decoding(s, "a", 6)  # 6 computed, 7 known
    a.draft_ids = [3, 4, 5, 6, 7, 8]  # positions 7..12: two more blocks of 4
    out = s.schedule()
    s.on_step_done(out)
    assert a.num_computed == 7  # the known token only, until the drafts are judged
    assert s.kv.blocks_held(a)["full"] == 4
    a.output_ids += [3, 4]  # the first draft accepted, then the model's own token
    s.accept_drafts(a, 1)
    assert a.num_computed == 8 == a.num_known - 1
    # As plain decoding would hold: positions 0..7 in two global blocks; the chunked layers have left chunk 0 (the
    # next position, 8, starts chunk 1, whose block the next step takes).
    assert s.kv.blocks_held(a) == {"full": 2, "chunked": 0}
    s.finish(a, "length")
    assert all_blocks_free(s)


def test_a_request_that_waits_for_blocks_counts_its_prefix_lookup_once():
    # 6 global blocks of 4 tokens: a's 20-token prompt and its growth take them all; b is tried every step (its
    # admission looks its prompt up, then finds no blocks) until a finishes. Its tokens count once in the hit rate.
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv_manager(full=6, chunked=64))
    a, b = seq("a", 20, max_tokens=4), seq("b", 8, max_tokens=2, first_token=50)
    s.add(a)
    simulate_step(s)
    s.add(b)
    waited = 0
    for _ in range(30):
        if not s.has_work():
            break
        out = simulate_step(s)
        waited += b.status is Status.WAITING
        assert not out.preempted
    assert not s.has_work() and waited >= 2, "b waited several steps for a's blocks"
    assert s.kv.prefix_queried_tokens == (20 - 1) + (8 - 1)
    assert all_blocks_free(s)
