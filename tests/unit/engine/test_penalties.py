"""A request's own tokens on its next token's logits: OpenAI's frequency and presence penalties, transformers'
repetition penalty, logit_bias and min_tokens, against plain references and through the engine."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.penalties import History, apply_penalties
from herd.engine.sampling_params import SamplingError
from herd.model.tiny import make_tiny

V = 50


def _openai(logits: torch.Tensor, output: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's documented formula, token by token:
    mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    out = logits.clone()
    for token in set(output):
        count = output.count(token)
        out[token] = logits[token] - count * frequency - (1.0 if count > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("seed", range(5))
def test_frequency_and_presence_penalties_match_openais_formula(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 3
    params, histories, expected = [], [], []
    for row in range(4):
        output = torch.randint(0, V, (int(torch.randint(0, 30, (1,), generator=g)),), generator=g).tolist()
        frequency, presence = (torch.rand(2, generator=g) * 4 - 2).tolist()
        if row == 2:  # a row without penalties is left alone
            frequency = presence = 0.0
        params.append(SamplingParams(frequency_penalty=frequency, presence_penalty=presence))
        histories.append(History(prompt_ids=[1, 2, 3], output_ids=output, stop_ids=frozenset()))
        expected.append(_openai(logits[row], output, frequency, presence))
    got = apply_penalties(logits, params, histories)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert got is not logits and torch.equal(got[2], logits[2])


@pytest.mark.parametrize("seed", range(5))
def test_repetition_penalty_matches_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, V, generator=g) * 3
    prompt = torch.randint(0, V, (12,), generator=g).tolist()
    output = torch.randint(0, V, (7,), generator=g).tolist()
    penalty = float(torch.rand(1, generator=g) * 2 + 0.1)
    reference = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())
    got = apply_penalties(logits, [SamplingParams(repetition_penalty=penalty)],
                          [History(prompt_ids=prompt, output_ids=output, stop_ids=frozenset())])
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    assert not torch.equal(got, logits), "the comparison can fail: the penalty changed something"


def test_logit_bias_adds_and_min_tokens_masks_the_end_tokens_until_reached():
    logits = torch.zeros(2, V)
    params = [SamplingParams(logit_bias={3: 5.0, 7: -100.0}), SamplingParams(min_tokens=2, max_tokens=8)]
    histories = [History([], [], frozenset()), History([], [4], frozenset({0, 9}))]
    got = apply_penalties(logits, params, histories)
    assert got[0, 3] == 5.0 and got[0, 7] == -100.0 and got[0].abs().sum() == 105.0
    assert got[1, 0] == float("-inf") and got[1, 9] == float("-inf") and got[1].isfinite().sum() == V - 2
    reached = apply_penalties(logits, params[1:], [History([], [4, 4], frozenset({0, 9}))])
    assert torch.equal(reached, logits), "once min_tokens are generated the end tokens are free again"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"logit_bias": {1: 100.5}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {i: 1 for i in range(301)}}, "logit_bias"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"min_tokens": -1}, "min_tokens"),
    ({"bad_words": ("",)}, "bad_words"), ({"bad_words": ("w",) * 65}, "bad_words"), ({"bad_words": "w"}, "bad_words"),
])
def test_bad_settings_are_refused_by_name(kwargs, field):
    with pytest.raises(SamplingError) as refused:
        SamplingParams(**kwargs)
    assert refused.value.field == field


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=3)
    return LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=8, max_num_seqs=8))


PROMPT = list(range(5, 25))


def test_a_bias_of_100_makes_every_sampled_token_that_token(engine):
    out = engine.generate([PROMPT], SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True,
                                                   logit_bias={77: 100}, seed=1))[0]
    assert out.token_ids == [77] * 16


def test_a_bias_of_minus_100_on_the_greedy_token_changes_greedy_output(engine):
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = engine.generate([PROMPT], greedy)[0].token_ids
    banned = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                      logit_bias={first[0]: -100}))[0].token_ids
    assert banned[0] != first[0]
    assert first[0] not in banned


def test_min_tokens_holds_back_a_stop_token_until_reached(engine):
    first = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].token_ids[0]
    stopped = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                       stop_token_ids=(first,)))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    held = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                    stop_token_ids=(first,), min_tokens=3))[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]


def test_penalties_in_a_mixed_batch_leave_the_other_rows_alone(engine):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate([PROMPT], plain)[0].token_ids
    mixed = engine.generate([PROMPT, PROMPT], [plain, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                     frequency_penalty=2.0, presence_penalty=2.0)])
    assert mixed[0].token_ids == alone
    repeats = len(alone) - len(set(alone))
    assert len(mixed[1].token_ids) - len(set(mixed[1].token_ids)) <= repeats


def test_a_logit_bias_outside_the_vocabulary_is_refused_when_added(engine):
    with pytest.raises(SamplingError, match="outside the vocabulary") as refused:
        engine.add_request(PROMPT, SamplingParams(logit_bias={engine.model.config.vocab_size: 1.0}))
    assert refused.value.field == "logit_bias"


def test_async_scheduling_samples_with_the_same_penalties(tmp_path):
    """The overlapped step samples on the model thread from copies of the histories: the same tokens."""
    path = make_tiny(tmp_path / "scout", preset="scout", seed=3)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8,
                            frequency_penalty=0.5, logit_bias={11: 3.0}, min_tokens=2)
    outs = [LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=8, max_num_seqs=8, async_scheduling=overlap))
            .generate([PROMPT, PROMPT[:9]], params) for overlap in (False, True)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_a_bad_words_last_token_is_masked_only_where_it_would_complete_the_word():
    logits = torch.zeros(3, V)
    words = ((5,), (7, 8))
    params = [SamplingParams(bad_words=("x",))] * 3
    histories = [History([], [1, 7], frozenset(), words), History([], [7, 1], frozenset(), words),
                 History([], [], frozenset(), words)]
    got = apply_penalties(logits, params, histories)
    assert got[0, 5] == got[0, 8] == float("-inf") and got[0].isfinite().sum() == V - 2
    assert got[1, 5] == float("-inf") and got[1, 8] == 0.0, "7 is not the last token: 8 completes nothing"
    assert got[2, 5] == float("-inf") and got[2].isfinite().sum() == V - 1


def test_bad_words_are_never_generated(engine):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = engine.generate([PROMPT], greedy)[0].token_ids
    tokenizer = engine.tokenizer
    banned = next(t for t in plain if any(tokenizer.encode(form, literal=True) == [t]
                                          for word in [tokenizer.decode([t])] for form in (word, " " + word.lstrip()))
                  and tokenizer.decode([t]).strip())
    out = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                   bad_words=(tokenizer.decode([banned]).strip(),)))[0].token_ids
    assert banned in plain and banned not in out
