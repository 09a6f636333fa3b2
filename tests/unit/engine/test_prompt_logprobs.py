"""Prompt log-probabilities: read from the prefill's own rows, equal to the log-softmax of the model's plain
full-sequence forward over the prompt, however the prompt is chunked, scheduled or recomputed."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams, prompt_logprobs
from herd.engine.sampling_params import MAX_LOGPROBS, SamplingError
from herd.model.tiny import make_tiny

SMALL = dict(kv_cache_mb=16, max_num_seqs=16, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=11)


def _prompts(count, seed, low=2, high=70):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g)
    return [torch.randint(3, 400, (int(n),), generator=g).tolist() for n in lengths]


def _reference(engine, ids, top):
    """The prompt's logprobs from one full causal forward: [None, (token, logprob, top ids), ...]."""
    logprobs = torch.log_softmax(engine.model.logits(torch.tensor(ids)), dim=-1)  # [T, V]
    out = [None]
    for position, token in enumerate(ids[1:]):
        row = logprobs[position]
        out.append((token, float(row[token]), row.topk(top).indices.tolist() if top else []))
    return out


def _check(got, want, *, tolerance=1e-4):
    assert got is not None and len(got) == len(want)
    assert got[0] is None
    for entry, (token, logprob, top_ids) in zip(got[1:], want[1:], strict=True):
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(logprob, abs=tolerance)
        assert [t for t, _ in entry.top] == top_ids
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)


def test_prompt_logprobs_is_checked_by_name():
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    for bad in (-1, MAX_LOGPROBS + 1, 1.5, True):
        with pytest.raises(SamplingError) as err:
            SamplingParams(prompt_logprobs=bad)
        assert err.value.field == "prompt_logprobs"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_logprobs_equal_the_full_forward_in_a_mixed_batch(scout, seed):
    """Chunked prefill (48-token steps, prompts up to 70) beside other requests' decodes; a request that asks none
    gets none."""
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    prompts = _prompts(6, seed)
    tops = [seed + i % 3 if i % 2 == 0 else None for i in range(len(prompts))]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=top) for top in tops]
    outs = engine.generate(prompts, params)
    for ids, top, out in zip(prompts, tops, outs, strict=True):
        if top is None:
            assert out.prompt_logprobs is None
        else:
            _check(out.prompt_logprobs, _reference(engine, ids, top))


def test_a_one_token_prompt_has_only_none(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    (out,) = engine.generate([[7]], SamplingParams(max_tokens=2, prompt_logprobs=3))
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunking_and_async_scheduling_give_the_same_prompt_logprobs(scout, async_scheduling):
    prompts = _prompts(5, 7, low=20, high=90)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=4)
    whole = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=16, max_num_batched_tokens=512))
    chunked = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=16, max_num_batched_tokens=7,
                                                            async_scheduling=async_scheduling))
    want, got = whole.generate(prompts, params), chunked.generate(prompts, params)
    for ids, a, b in zip(prompts, want, got, strict=True):
        assert a.token_ids == b.token_ids
        _check(b.prompt_logprobs, [None] + [(e.token_id, e.logprob, [t for t, _ in e.top])
                                            for e in a.prompt_logprobs[1:]])
        _check(b.prompt_logprobs, _reference(whole, ids, 4))


def test_a_request_asking_prompt_logprobs_takes_no_prefix_cache_hit(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    (prompt,) = _prompts(1, 3, low=60, high=61)
    plain = SamplingParams(temperature=0, max_tokens=2)
    engine.generate([prompt], plain)
    (cached,) = engine.generate([prompt], plain)
    assert cached.num_cached_tokens > 0 and cached.prompt_logprobs is None
    (asking,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))
    assert asking.num_cached_tokens == 0
    _check(asking.prompt_logprobs, _reference(engine, prompt, 1))
    assert asking.token_ids == cached.token_ids


def test_prompt_logprobs_come_with_the_first_token_and_stay(scout):
    engine = LLMEngine.from_pretrained(scout, EngineConfig(**SMALL))
    (prompt,) = _prompts(1, 4, low=30, high=31)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=2),
                       request_id="r")
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [len(o.token_ids) for o in outputs] == [1, 2, 3]
    first = outputs[0].prompt_logprobs
    _check(first, _reference(engine, prompt, 2))
    assert outputs[-1].finished and outputs[-1].prompt_logprobs == first


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_recomputes_without_scoring_the_prompt_twice(scout, async_scheduling, monkeypatch):
    """A cache too small for every request at once: requests are preempted with their prompts partly scored
    and wholly scored, and recomputed (taking cached blocks only up to what they scored); each prompt's
    logprobs are still one per prompt token and equal the full forward's."""
    prompts = _prompts(10, 9, low=30, high=90)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, prompt_logprobs=1)
    engine = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=0.6, max_model_len=128, max_num_seqs=16,
                                                           max_num_batched_tokens=24,
                                                           async_scheduling=async_scheduling))
    preempt, at_preemption = engine.scheduler._preempt, []

    def spying(seq, out):
        at_preemption.append(len(seq.prompt_logprobs) / len(seq.prompt_ids))
        preempt(seq, out)

    engine.scheduler._preempt = spying
    plan, rows_planned = prompt_logprobs.plan, Counter()

    def counting(chunks):
        planned = plan(chunks)
        rows_planned.update({p.seq.request_id: len(p.targets) for p in planned})
        return planned

    monkeypatch.setattr(prompt_logprobs, "plan", counting)
    outs = engine.generate(prompts, params)
    assert any(share < 1 for share in at_preemption) and any(share == 1 for share in at_preemption), at_preemption
    assert sorted(rows_planned.values()) == sorted(len(ids) - 1 for ids in prompts)  # each row computed once
    for ids, out in zip(prompts, outs, strict=True):
        _check(out.prompt_logprobs, _reference(engine, ids, 1))
