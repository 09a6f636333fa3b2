"""Async scheduling: the next step is scheduled while the current forward runs, and nothing a caller sees changes
(the same tokens, finishes and freed blocks as steps scheduled one after another)."""

from __future__ import annotations

import threading

import pytest
import torch

from herd.engine import EngineConfig, HerdError, LLMEngine, SamplingParams
from herd.engine.errors import Code
from herd.model.tiny import make_tiny

SMALL = dict(kv_cache_mb=16, max_num_seqs=16, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=5)


def _prompts(count, seed, low=3, high=70):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [torch.randint(3, 400, (int(n),), generator=g).tolist() for n in lengths]


def _free(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def _workload(scout, seed):
    """Prompts with shared prefixes, and per request greedy or seeded sampling, a max_tokens, and for some a stop
    token taken from a free run (so they stop early, mid-batch)."""
    prompts = _prompts(12, seed)
    prompts[4] = prompts[1][:40] + prompts[4]
    free = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL)).generate(
        prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        stop = [out.token_ids[3 + i % 5]] if i % 3 == 0 else []
        params.append(SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=6 + (7 * i) % 19,
                                     ignore_eos=True, stop_token_ids=stop, logprobs=1 if i % 4 == 0 else None))
    return prompts, params


@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_finishes_and_blocks_as_scheduling_after_each_step(scout, seed):
    prompts, params = _workload(scout, seed)
    reference = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=True))
    rows = {id(reference): 0, id(engine): 0}  # tokens each engine scheduled (budget spent)

    def counting(e):
        schedule = e.scheduler.schedule

        def counted():
            out = schedule()
            rows[id(e)] += sum(c.num_tokens for c in out.chunks)
            return out
        return counted

    for e in (reference, engine):
        e.scheduler.schedule = counting(e)
    want = reference.generate(prompts, params)
    got = engine.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert [o.text for o in got] == [o.text for o in want]
    stopped = sum(o.finish_reason == "stop" for o in got)
    assert stopped >= 2, "some requests stopped on a token mid-batch"
    # A request that stops on a token wastes at most the one row scheduled before its stop was seen; one that
    # ends by length wastes none (its last token is known to be its last, so nothing is scheduled after it).
    assert rows[id(reference)] <= rows[id(engine)] <= rows[id(reference)] + stopped
    assert _free(engine) and not engine.has_unfinished()


def test_same_tokens_under_preemption(scout):
    prompts, params = _workload(scout, 2)
    tight = dict(SMALL, kv_cache_mb=0.6, max_model_len=128)
    reference = LLMEngine.from_pretrained(scout, EngineConfig(**tight))
    want = reference.generate(prompts, params)
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**tight, async_scheduling=True))
    got = engine.generate(prompts, params)
    assert reference.scheduler.num_preemptions > 0 and engine.scheduler.num_preemptions > 0
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert _free(engine)


def test_the_next_step_is_scheduled_while_the_forward_runs(scout):
    """Each forward waits until the scheduler has run again: with steps scheduled after the forward returns, it
    would wait in vain (and the step would end with the forward's timeout)."""
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=True))
    schedules = [0]
    scheduled = threading.Condition()
    original_schedule, original_prepare = engine.scheduler.schedule, engine.runner.prepare

    def schedule():
        out = original_schedule()
        with scheduled:
            schedules[0] += 1
            scheduled.notify_all()
        return out

    overlapped = []

    def prepare(chunks):
        forward = original_prepare(chunks)
        before = schedules[0]

        def waiting_forward():
            with scheduled:
                overlapped.append(scheduled.wait_for(lambda: schedules[0] > before, timeout=20))
            return forward()

        return waiting_forward

    engine.scheduler.schedule, engine.runner.prepare = schedule, prepare
    out = engine.generate(_prompts(3, 9), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [4, 4, 4]
    assert overlapped and all(overlapped), overlapped


def test_abort_and_a_failed_step_free_everything_and_the_engine_goes_on(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=True, fault_hold_s=0))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = _prompts(4, 11)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"r{i}")
    for _ in range(3):
        engine.step()
    assert engine.abort("r0")
    outputs = engine.step()
    assert [o.finish_reason for o in outputs if o.request_id == "r0"] == ["abort"]

    original = engine.runner.prepare

    def failing(chunks):
        def forward():
            raise HerdError(Code.UNAVAILABLE, "an expert shard is gone")
        return forward

    engine.runner.prepare = failing
    failed = {o.request_id: o for o in engine.step()}
    engine.runner.prepare = original
    assert {rid for rid, o in failed.items() if o.finish_reason == "error"} == {"r1", "r2", "r3"}
    assert failed["r1"].error.code is Code.UNAVAILABLE
    while engine.has_unfinished():
        assert not [o for o in engine.step() if o.request_id in {"r0", "r1", "r2", "r3"}], "nothing after the end"
    assert _free(engine)
    again = engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    want = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL)).generate(
        [prompts[0]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert again.token_ids == want.token_ids
    assert _free(engine)
