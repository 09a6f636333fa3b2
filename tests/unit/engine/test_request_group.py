"""n and best_of: the choices of one request share its prompt's KV blocks (copy-on-write), sample apart, and
every block comes back; best_of keeps the n with the highest cumulative log-probability."""

from __future__ import annotations

import asyncio

import pytest
import torch

from herd.engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from herd.engine.request_group import child_seed
from herd.engine.sampling_params import MAX_N, SamplingError
from herd.model.tiny import make_tiny

SMALL = dict(kv_cache_mb=16, max_num_seqs=32)
PROMPT = list(range(3, 3 + 37))  # 37 tokens: the last prompt block is partial (B = 16 on the tiny model)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=2)


@pytest.fixture(scope="module", params=[False, True], ids=["inline", "async-scheduling"])
def engine(scout, request):
    return LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, async_scheduling=request.param))


def _all_blocks_free(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def _run(engine):
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    return outputs


def test_n_choices_at_temperature_one_have_indexes_and_differ(engine):
    distinct = 0
    for seed in range(3):
        outs = engine.generate(PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed))
        assert [o.index for o in outs] == [0, 1, 2, 3]
        assert all(len(o.token_ids) == 8 for o in outs)
        distinct += len({tuple(o.token_ids) for o in outs}) > 1
        unseeded = engine.generate(PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=8, ignore_eos=True))
        distinct += len({tuple(o.token_ids) for o in unseeded}) > 1
    assert distinct == 6, "a child drawing child 0's uniforms would repeat its tokens"
    assert _all_blocks_free(engine)


def test_n_choices_at_temperature_zero_are_the_single_greedy_output(engine):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    (single,) = engine.generate(PROMPT, greedy)
    outs = engine.generate(PROMPT, SamplingParams(n=4, temperature=0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == [single.token_ids] * 4
    assert _all_blocks_free(engine)


def test_seeded_choices_repeat_exactly(engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=123)
    first = [o.token_ids for o in engine.generate(PROMPT, params)]
    again = [o.token_ids for o in engine.generate(PROMPT, params)]
    assert first == again


def test_choices_share_the_prompt_blocks(scout):
    def held_after(params, count, steps):
        engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL, enable_prefix_caching=False))
        for _ in range(count):
            engine.add_request(PROMPT, params)
        for _ in range(steps):
            engine.step()
        assert engine.stats().running == 4
        held = engine.stats().kv_blocks_held
        engine.abort_all()
        _run(engine)
        assert _all_blocks_free(engine)
        return held

    single = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    separate = held_after(single, 4, 6)
    shared = held_after(SamplingParams(n=4, temperature=1.0, max_tokens=20, ignore_eos=True), 1, 6)
    assert shared < separate
    # 37 prompt tokens: 2 full global blocks shared by all, each choice its own partial block (copied).
    assert separate - shared >= 3 * 2


def test_every_block_comes_back_after_finish_and_after_abort(engine):
    engine.generate(PROMPT, SamplingParams(n=5, temperature=1.0, max_tokens=6))  # some may stop early
    assert _all_blocks_free(engine)
    rid = engine.add_request(PROMPT, SamplingParams(n=4, temperature=1.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert not _all_blocks_free(engine)
    assert engine.abort(rid)
    finished = [o for o in _run(engine) if o.finished]
    assert sorted(o.index for o in finished) == [0, 1, 2, 3]
    assert {o.finish_reason for o in finished} == {"abort"} and {o.request_id for o in finished} == {rid}
    assert _all_blocks_free(engine)


def test_abort_before_the_prompt_is_computed_ends_every_choice(engine):
    rid = engine.add_request(PROMPT, SamplingParams(n=3, max_tokens=5))
    assert engine.abort(rid)
    finished = [o for o in _run(engine) if o.finished]
    assert sorted(o.index for o in finished) == [0, 1, 2]
    assert _all_blocks_free(engine)


def test_best_of_keeps_the_n_choices_with_the_highest_cumulative_logprob(engine):
    base = dict(temperature=1.0, max_tokens=8, ignore_eos=True, seed=7)
    every = engine.generate(PROMPT, SamplingParams(n=5, logprobs=0, **base))
    totals = [sum(lp.logprob for lp in o.logprobs) for o in every]
    for o, total in zip(every, totals, strict=True):
        assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)
    best = engine.generate(PROMPT, SamplingParams(n=2, best_of=5, **base))
    assert [o.index for o in best] == [0, 1]
    ranked = sorted(zip(totals, (o.token_ids for o in every), strict=True), key=lambda pair: -pair[0])
    assert [o.token_ids for o in best] == [tokens for _, tokens in ranked[:2]]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert best[0].logprobs is None, "logprobs were not asked for"
    assert _all_blocks_free(engine)


def test_best_of_streams_nothing_until_every_candidate_is_done(engine):
    rid = engine.add_request(PROMPT, SamplingParams(n=1, best_of=3, max_tokens=4, ignore_eos=True))
    outs = [o for o in _run(engine) if o.request_id == rid]
    assert len(outs) == 1 and outs[0].finished and outs[0].index == 0


def test_async_engine_streams_every_choice(scout):
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(scout, EngineConfig(**SMALL)))

    async def collect():
        tokens = {}
        finished = []
        async for out in engine.generate(PROMPT, SamplingParams(n=3, max_tokens=6, ignore_eos=True)):
            tokens.setdefault(out.index, []).extend(out.delta_token_ids)
            if out.finished:
                finished.append(out.index)
        return tokens, finished

    tokens, finished = asyncio.run(collect())
    assert sorted(finished) == [0, 1, 2]
    assert {i: len(t) for i, t in tokens.items()} == {0: 6, 1: 6, 2: 6}


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(n=0), "n"), (dict(n=MAX_N + 1), "n"), (dict(n=True), "n"),
    (dict(n=3, best_of=2), "best_of"), (dict(best_of=MAX_N + 1), "best_of"),
])
def test_bad_n_and_best_of_are_refused_by_name(kwargs, field):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_more_choices_than_the_engine_runs_at_once_are_refused(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=16, max_num_seqs=2))
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request(PROMPT, SamplingParams(n=3))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["inline", "async-scheduling"])
def test_choices_survive_preemption_unchanged(scout, async_scheduling):
    """A cache too small for the batch preempts (and recomputes) choices, forked or not: the greedy choices still
    equal one greedy request each, the seeded ones their unpressed selves, and every block comes back."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (int(n),), generator=g).tolist() for n in torch.randint(5, 70, (6,), generator=g)]
    roomy = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    seeded = SamplingParams(n=3, temperature=1.0, max_tokens=20, ignore_eos=True, seed=9)
    singles = [o.token_ids for o in roomy.generate(prompts, greedy)]
    unpressed = [o.token_ids for o in roomy.generate(prompts, seeded)]
    tight = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=1, max_model_len=128, max_num_seqs=64,
                                                          max_num_batched_tokens=64, async_scheduling=async_scheduling))
    choices = [o.token_ids for o in tight.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=20,
                                                                           ignore_eos=True))]
    assert choices == [s for s in singles for _ in range(3)]
    assert [o.token_ids for o in tight.generate(prompts, seeded)] == unpressed
    assert tight.stats().preemptions > 0, "the cache was meant to run short"
    assert _all_blocks_free(tight)


def test_each_seeded_choice_is_the_request_alone_with_its_derived_seed(engine):
    """Choice i draws from child_seed(seed, i) over its own context: a shared block written in place by two
    choices (no copy-on-write) would change what the later ones see."""
    base = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    choices = engine.generate(PROMPT, SamplingParams(n=4, seed=11, **base))
    alone = [engine.generate(PROMPT, SamplingParams(seed=child_seed(11, i), **base))[0] for i in range(4)]
    assert [o.token_ids for o in choices] == [o.token_ids for o in alone]
    assert child_seed(11, 0) == 11 and len({child_seed(11, i) for i in range(16)}) == 16
