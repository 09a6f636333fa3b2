"""A step whose experts are unreachable is held and retried, not failed (issue 27): the requests see a pause and
the output of an undisturbed run; past fault_hold_s they end with a generic UNAVAILABLE."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from herd.engine import AsyncLLMEngine, EngineConfig, HerdError, LLMEngine, SamplingParams
from herd.engine.errors import Code
from herd.engine.fault_hold import RETRY_AFTER_S
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.structured_output import StructuredOutput
from herd.model.moe import MoE
from herd.model.tiny import make_tiny

SMALL = dict(kv_cache_mb=16, max_num_seqs=16, max_num_batched_tokens=48, fault_retry_interval_s=0.001)
ADDRESS = "10.0.0.7"


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=7)


class FlakyExperts:
    """The model's own experts, behind a shard that is down for some forwards: `down(n)` of the forward's number
    (from 1) says whether its last MoE layer raises, after the earlier layers wrote their KV."""

    def __init__(self, engine: LLMEngine, down) -> None:
        self.layers = {m.layer: m.experts for m in engine.model.modules() if isinstance(m, MoE)}
        self.first, self.last = min(self.layers), max(self.layers)
        self.down = down
        self.forwards = 0
        self.failures = 0
        self.failed_once = threading.Event()
        engine.model.set_experts_executor(self)

    def __call__(self, layer: int, rows: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        if layer == self.first:
            self.forwards += 1
        if layer == self.last and self.down(self.forwards):
            self.failures += 1
            self.failed_once.set()
            raise HerdError(Code.UNAVAILABLE, f"expert shard at {ADDRESS}:5000 gone")
        return self.layers[layer](rows, expert_offsets)


def _engine(scout, **config) -> LLMEngine:
    return LLMEngine.from_pretrained(scout, EngineConfig(**{**SMALL, **config}))


def _free(engine: LLMEngine) -> bool:
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def _workload():
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (70, 9, 33, 55)]
    prompts.append([*prompts[0][:40], 11, 12, 13])  # a cached prefix
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=21, max_tokens=9, ignore_eos=True)
    forked = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=6, ignore_eos=True)
    return prompts, [greedy, seeded, greedy, forked, seeded]


def _tokens(outputs):
    return [(o.request_id, o.index, o.token_ids, o.finish_reason) for o in outputs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_failed_steps_are_held_and_the_output_is_the_undisturbed_one(scout, async_scheduling):
    """With async scheduling a failed step was counted done and the next scheduled on it: its sequences are
    computed again from their tokens instead, with the same output."""
    prompts, params = _workload()
    steady = _engine(scout)
    FlakyExperts(steady, lambda n: False)
    want = steady.generate(prompts, params)

    engine = _engine(scout, async_scheduling=async_scheduling)
    # forwards 2-4: the 70-token prompt's chunked prefill and the others' first chunks; 9-11: mid-decode
    flaky = FlakyExperts(engine, lambda n: 2 <= n <= 4 or 9 <= n <= 11)
    got = engine.generate(prompts, params)
    assert flaky.failures == 6
    assert _tokens(got) == _tokens(want)
    assert _free(engine)
    stats = engine.stats()
    assert (stats.fault_failed_steps, stats.fault_holds, stats.fault_recoveries) == (6, 2, 2)
    assert not stats.fault_held and stats.fault_last_recovery_s >= 0


def test_a_held_step_retries_its_drafts_grammar_masks_and_penalties_unchanged(scout):
    """Speculative decoding (a failed step's drafts are verified again), a structured constraint (its masks were
    filled for the failed step) and penalties (histories), failed mid-decode and on steps that verify drafts."""
    repeat = list(range(20, 32))
    prompts = [repeat * 4, list(range(40, 60)), [*repeat, *repeat, 7, 8]]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured=StructuredOutput("json_object", "")),
              SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True, frequency_penalty=1.5)]
    prompts.insert(1, prompts[0])
    speculative = SpeculativeConfig(method="ngram", num_tokens=3, prompt_lookup_min=1)
    steady = _engine(scout, speculative=speculative)
    FlakyExperts(steady, lambda n: False)
    want = steady.generate(prompts, params)
    engine = _engine(scout, speculative=speculative)
    with_drafts = []

    def down(n):  # the 4th forward, and the first two that verify drafts
        if len(with_drafts) < 2 and any(seq.draft_ids for seq in engine.scheduler.running):
            with_drafts.append(n)
            return True
        return n == 4

    flaky = FlakyExperts(engine, down)
    got = engine.generate(prompts, params)
    assert len(with_drafts) == 2 and flaky.failures == 3
    assert _tokens(got) == _tokens(want)
    assert engine.stats().draft_tokens == steady.stats().draft_tokens > 0, "the same drafts were verified"
    assert engine.stats().accepted_tokens == steady.stats().accepted_tokens
    assert _free(engine)


def test_past_the_hold_the_requests_end_unavailable_without_internal_addresses(scout):
    engine = _engine(scout, fault_hold_s=10)
    flaky = FlakyExperts(engine, lambda n: n >= 3)  # the shard never comes back
    engine.faults.clock = lambda: float(flaky.failures)  # one second per failed step
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, prompt in enumerate(_workload()[0][:3]):
        engine.add_request(prompt, params, request_id=f"r{i}")
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in final, "nothing after the end"
            if out.finished:
                final[out.request_id] = out
    assert flaky.failures == 11, "held from the first failure (t=1) until 10 s had passed"
    assert set(final) == {"r0", "r1", "r2"}
    for out in final.values():
        assert out.finish_reason == "error"
        assert out.error.code is Code.UNAVAILABLE and out.error.retry_after_s == RETRY_AFTER_S
        assert ADDRESS not in out.error.message
    assert _free(engine)
    stats = engine.stats()
    assert (stats.fault_failed_steps, stats.fault_holds, stats.fault_recoveries) == (11, 1, 0)
    assert not stats.fault_held, "no work left: the hold is over"


def test_a_hold_of_zero_fails_the_step_at_once(scout):
    engine = _engine(scout, fault_hold_s=0)
    flaky = FlakyExperts(engine, lambda n: n == 3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for i, prompt in enumerate(_workload()[0][1:3]):
        engine.add_request(prompt, params, request_id=f"r{i}")
    outputs = [engine.step() for _ in range(3)][-1]
    assert flaky.failures == 1
    assert {o.request_id: o.finish_reason for o in outputs} == {"r0": "error", "r1": "error"}
    assert ADDRESS in outputs[0].error.message, "the step's own error, as before holds"
    assert not engine.has_unfinished() and _free(engine)
    assert (engine.stats().fault_failed_steps, engine.stats().fault_holds) == (1, 0)


def test_a_request_sent_during_a_hold_is_served_when_the_experts_return(scout):
    prompts = [list(range(5, 30)), list(range(40, 52))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = [o.token_ids for o in _engine(scout).generate(prompts, params)]
    engine = AsyncLLMEngine(_engine(scout))
    core = engine.engine
    with_both = []

    def down(n):  # down from the second forward until two forwards with both requests have failed
        if n < 2 or sum(with_both) > 2:
            return False
        with_both.append(len(core.scheduler.running) == 2)
        return sum(with_both) <= 2

    flaky = FlakyExperts(core, down)

    async def consume(prompt):
        last = None
        async for out in engine.generate(prompt, params):
            last = out
        return last

    async def main():
        first = asyncio.create_task(consume(prompts[0]))
        assert await asyncio.to_thread(flaky.failed_once.wait, 30)
        second = await consume(prompts[1])  # sent during the hold
        return await first, second

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert sum(with_both) == 3 and flaky.failures >= 3
    stats = core.stats()
    assert stats.fault_holds == 1 and stats.fault_recoveries == 1 and not stats.fault_held
    assert _free(core)
