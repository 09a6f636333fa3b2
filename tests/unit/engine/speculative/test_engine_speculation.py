"""Speculative decoding through the engine: the tokens are the model's own, token for token, whatever the drafts
(a proposer that knows the answer and corrupts it, prompt lookup), with every finish, logprobs, constraints, n > 1
and seeded sampling; no KV block is lost or left different by a rejected draft."""

from __future__ import annotations

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.speculator import Speculator
from herd.engine.structured_output import StructuredOutput
from herd.model.tiny import make_tiny
from tests.unit.engine.speculative.oracle import OracleProposer

SMALL = dict(kv_cache_mb=16, max_num_seqs=32, block_size=4, max_num_batched_tokens=40)
NGRAM = SpeculativeConfig(method="ngram", num_tokens=4)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=4)


def _prompts(count, seed, low=3, high=50):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(5, 400, (n,), generator=g).tolist() for n in lengths]


def _params(count, **extra):
    return [SamplingParams(temperature=0, max_tokens=1 + (7 * i) % 40, ignore_eos=True, **extra)
            for i in range(count)]


def _with_oracle(path, references, *, clean=False, **config):
    engine = LLMEngine.from_pretrained(path, EngineConfig(**(SMALL | config), speculative=NGRAM))
    oracle = OracleProposer(references, vocab=engine.model.config.vocab_size, clean=clean)
    engine.speculator = Speculator(NGRAM, oracle)
    return engine, oracle


def _idle(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def _cached(engine):
    return {group: pool.cached_hashes() for group, pool in engine.kv.pools.items()}


def test_greedy_tokens_and_kv_blocks_equal_plain_decoding_whatever_the_drafts(tiny):
    prompts = _prompts(24, 0)
    params = _params(24)
    plain = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL))
    expected = plain.generate(prompts, params)
    references = {tuple(p): o.token_ids for p, o in zip(prompts, expected, strict=True)}
    engine, _ = _with_oracle(tiny, references)
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.finish_reason for o in got] == ["length"] * 24
    stats = engine.stats()
    assert stats.draft_tokens > 200 and 0 < stats.accepted_tokens < stats.draft_tokens  # both paths taken
    assert sum(o.verify_steps for o in got) > 0
    assert sum(o.accepted_tokens for o in got) == stats.accepted_tokens
    assert _idle(engine)
    # Rejected drafts cached nothing: the global pool (large enough never to evict) caches the very blocks plain
    # decoding cached, and the chunked pool (which evicts, in an order that follows the steps) nothing else.
    cached, reference = _cached(engine), _cached(plain)
    assert cached["full"] == reference["full"]
    assert cached["chunked"] <= reference["full"]


def test_prompt_lookup_gives_the_plain_tokens(tiny):
    base = _prompts(10, 1, low=8, high=30)
    prompts = [p + p[: len(p) // 2] + p for p in base]  # repeats for the lookup to find
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL)).generate(prompts, params)
    engine = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL, speculative=NGRAM))
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert engine.stats().draft_tokens > 0
    assert _idle(engine)


def test_a_request_that_opts_out_verifies_nothing(tiny):
    prompts = _prompts(4, 2)
    references = {tuple(p): [] for p in prompts}
    engine, _ = _with_oracle(tiny, references)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, speculative=False))
    assert all(o.draft_tokens == 0 and o.verify_steps == 0 for o in outs)
    assert engine.stats().draft_tokens == 0


def test_stop_tokens_inside_the_drafts_end_the_request_where_plain_decoding_does(tiny):
    prompts = _prompts(12, 3)
    free = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    plain = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL))
    runs = plain.generate(prompts, free)
    # Stop at the token generated 5th-12th (so inside a run of accepted drafts), by id.
    stops = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                            stop_token_ids=[o.token_ids[5 + i % 8]]) for i, o in enumerate(runs)]
    expected = plain.generate(prompts, stops)
    references = {tuple(p): o.token_ids for p, o in zip(prompts, runs, strict=True)}
    engine, _ = _with_oracle(tiny, references, clean=True)
    got = engine.generate(prompts, stops)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected] == ["stop"] * 12
    assert _idle(engine)


def test_a_stop_string_inside_accepted_drafts_cuts_tokens_and_text_as_plain_decoding_does(tiny):
    prompts = _prompts(8, 4)
    plain = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL))
    runs = plain.generate(prompts, [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 8)
    stops = []
    for out in runs:
        text = out.text
        middle = text[len(text) // 2 : len(text) // 2 + 3]
        stops.append(SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                    stop=[middle] if middle.strip() else None))
    expected = plain.generate(prompts, stops)
    references = {tuple(p): o.token_ids for p, o in zip(prompts, runs, strict=True)}
    engine, _ = _with_oracle(tiny, references, clean=True)
    got = engine.generate(prompts, stops)
    assert [(o.text, o.token_ids, o.finish_reason) for o in got] == \
        [(o.text, o.token_ids, o.finish_reason) for o in expected]
    assert _idle(engine)


def test_logprobs_are_the_target_models_own(tiny):
    prompts = _prompts(6, 5)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL)).generate(prompts, params)
    references = {tuple(p): o.token_ids for p, o in zip(prompts, expected, strict=True)}
    engine, _ = _with_oracle(tiny, references)
    got = engine.generate(prompts, params)
    for a, b in zip(got, expected, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.logprobs) == len(b.logprobs) == 20
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]


def test_seeded_sampling_gives_the_same_tokens_with_and_without_drafts(tiny):
    prompts = _prompts(12, 6)
    params = [SamplingParams(temperature=1.0, top_k=20, max_tokens=24, ignore_eos=True, seed=100 + i,
                             repetition_penalty=1.2 if i % 3 == 0 else 1.0) for i in range(12)]
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL)).generate(prompts, params)
    references = {tuple(p): o.token_ids for p, o in zip(prompts, expected, strict=True)}
    engine, _ = _with_oracle(tiny, references)
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert engine.stats().accepted_tokens > 0


def test_n_choices_and_preemption_keep_the_plain_tokens(tiny):
    prompts = _prompts(6, 7, low=20, high=40)
    params = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=i, n=3) for i in range(6)]
    tight = dict(kv_cache_mb=16, max_num_seqs=32, block_size=4, max_num_batched_tokens=40)
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(**tight)).generate(prompts, params)
    engine = LLMEngine.from_pretrained(tiny, EngineConfig(**tight, speculative=NGRAM))
    got = engine.generate(prompts, params)
    assert [(o.request_id, o.index, o.token_ids) for o in got] == \
        [(o.request_id, o.index, o.token_ids) for o in expected]
    assert _idle(engine)


def test_constrained_outputs_check_drafts_against_the_grammar(tiny):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
              "required": ["a", "b"], "additionalProperties": False}
    prompts = _prompts(6, 8)
    params = SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutput.json_schema(schema))
    expected = LLMEngine.from_pretrained(tiny, EngineConfig(**SMALL)).generate(prompts, params)
    # The oracle drafts the answer with one token changed (often one the grammar refuses), then guesses past it.
    references = {tuple(p): o.token_ids for p, o in zip(prompts, expected, strict=True)}
    engine, _ = _with_oracle(tiny, references)
    got = engine.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in expected]
    assert engine.stats().accepted_tokens > 0
    assert _idle(engine)
