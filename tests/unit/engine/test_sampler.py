"""herd.engine.sampler: greedy, temperature, top-k, top-p, min-p, seeded draws and log-probabilities.

Legend: V vocab. Filters are checked by drawing many samples of one seeded request (positions 0..n-1, in one
batched pass) and comparing the set of drawn tokens with the set the rule allows: nothing outside it,
everything inside it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from herd.engine.sampler import TokenLogprobs, sample_batch
from herd.engine.sampling_params import SamplingParams

DRAWS = 500
N_FREQ = 2500  # draws for frequency checks: 3 sigma of a 0.5 frequency is about 0.03

# Known probabilities, deliberately not in sorted order so that the filters must sort.
# index:               0     1     2     3
KNOWN_PROBS = [0.15, 0.5, 0.05, 0.3]
BEST, SECOND, THIRD, WORST = 1, 3, 0, 2


def known_logits() -> torch.Tensor:
    return torch.log(torch.tensor(KNOWN_PROBS, dtype=torch.float32))  # [V]


def sample(
    logits: torch.Tensor, params: SamplingParams, position: int = 0, generator: torch.Generator | None = None
) -> tuple[int, TokenLogprobs | None]:
    """One row's token and log-probabilities from logits [V]."""
    tokens, logprobs = sample_batch(logits[None], [params], [position], generator)
    return tokens[0], logprobs[0]


def draw(logits: torch.Tensor, params: SamplingParams, n: int = DRAWS) -> Counter[int]:
    """Counts of the n tokens a seeded request draws at positions 0..n-1 from the same logits [V]."""
    assert params.seed is not None
    tokens, _ = sample_batch(logits.expand(n, -1), [params] * n, list(range(n)), None)
    return Counter(tokens)


# --- greedy ---------------------------------------------------------------------------------------


def test_greedy_picks_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9, 0.0])
    token, logprobs = sample(logits, SamplingParams(temperature=0.0))
    assert token == 1
    assert logprobs is None


def test_greedy_ignores_generator_and_filters() -> None:
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.9)
    tokens = {sample(logits, params, s, torch.Generator().manual_seed(s))[0] for s in range(5)}
    assert tokens == {int(torch.argmax(logits))}


# --- temperature and seeds -------------------------------------------------------------------------


def flat_logits() -> torch.Tensor:
    return 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(1))  # [V], nearly uniform


def seeded_run(seed: int, n: int = 40) -> list[int]:
    """A seeded request's first n tokens, one step at a time."""
    params = SamplingParams(temperature=1.0, seed=seed)
    return [sample(flat_logits(), params, position)[0] for position in range(n)]


def test_seeded_sampling_repeats_whatever_the_global_rng() -> None:
    torch.manual_seed(123)
    first = seeded_run(7)
    torch.manual_seed(456)
    torch.rand(10)  # move the global generator on; the request's draws must not care
    second = seeded_run(7)
    assert first == second


def test_seeded_draws_step_by_step_equal_one_batched_pass() -> None:
    assert seeded_run(7) == sample_batch(flat_logits().expand(40, -1), [SamplingParams(seed=7)] * 40,
                                         list(range(40)), torch.Generator().manual_seed(0))[0]


def test_different_seeds_give_different_samples() -> None:
    first, second = seeded_run(7), seeded_run(8)
    assert first != second
    assert len(set(first)) > 10  # nearly uniform over 1000 tokens: not stuck on one token


def test_temperature_one_follows_the_model_distribution() -> None:
    counts = draw(known_logits(), SamplingParams(temperature=1.0, seed=3), n=N_FREQ)
    for token, p in enumerate(KNOWN_PROBS):
        assert counts[token] / N_FREQ == pytest.approx(p, abs=0.03)


def test_temperature_divides_the_logits() -> None:
    # Temperature 0.5 squares the probabilities (before renormalising).
    counts = draw(known_logits(), SamplingParams(temperature=0.5, seed=4), n=N_FREQ)
    squared = [p * p for p in KNOWN_PROBS]
    for token, q in enumerate(squared):
        assert counts[token] / N_FREQ == pytest.approx(q / sum(squared), abs=0.03)


def test_tiny_positive_temperature_behaves_like_greedy() -> None:
    """A temperature the params accept must not crash the sampler (one bad request fails a whole batch step).

    Dividing float32 logits by 1e-40 overflows to +-inf, softmax gives NaN and multinomial raises. Refusing
    such temperatures in SamplingParams is a fix as good as sampling greedily.
    """
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 5  # [V]
    try:
        params = SamplingParams(temperature=1e-40, seed=1)
    except ValueError:
        return
    token, _ = sample(logits, params)
    assert token == int(torch.argmax(logits))


# --- top-k ----------------------------------------------------------------------------------------


def test_top_k_one_is_argmax_even_at_high_temperature() -> None:
    logits = torch.randn(200, generator=torch.Generator().manual_seed(2))
    counts = draw(logits, SamplingParams(temperature=50.0, top_k=1, seed=5), n=300)
    assert set(counts) == {int(torch.argmax(logits))}


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_only_draws_the_k_most_likely(k: int) -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(k))  # distinct values
    allowed = set(torch.topk(logits, k).indices.tolist())
    counts = draw(logits, SamplingParams(temperature=20.0, top_k=k, seed=k))
    assert set(counts) == allowed


def test_top_k_at_least_vocab_keeps_everything() -> None:
    counts = draw(known_logits(), SamplingParams(temperature=1.0, top_k=10, seed=6))
    assert set(counts) == {0, 1, 2, 3}


# --- top-p ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("top_p", "allowed"),
    [
        (0.3, {BEST}),
        (0.5, {BEST}),  # the first token alone reaches 0.5
        (0.6, {BEST, SECOND}),
        (0.8, {BEST, SECOND}),  # 0.5 + 0.3 reaches 0.8
        (0.9, {BEST, SECOND, THIRD}),
        (0.97, {BEST, SECOND, THIRD, WORST}),
        (1.0, {BEST, SECOND, THIRD, WORST}),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_top_p(top_p: float, allowed: set[int]) -> None:
    counts = draw(known_logits(), SamplingParams(temperature=1.0, top_p=top_p, seed=11))
    assert set(counts) == allowed


def test_top_p_renormalises_the_kept_tokens() -> None:
    counts = draw(known_logits(), SamplingParams(temperature=1.0, top_p=0.6, seed=12), n=N_FREQ)
    assert counts[BEST] / N_FREQ == pytest.approx(0.5 / 0.8, abs=0.03)
    assert counts[SECOND] / N_FREQ == pytest.approx(0.3 / 0.8, abs=0.03)


def test_top_p_applies_after_top_k() -> None:
    # top_k=2 leaves 0.5 and 0.3, renormalised to 0.625 and 0.375; top_p=0.6 then keeps only the first.
    counts = draw(known_logits(), SamplingParams(temperature=1.0, top_k=2, top_p=0.6, seed=13))
    assert set(counts) == {BEST}


# --- min-p ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_p", "allowed"),
    [
        (0.05, {BEST, SECOND, THIRD, WORST}),  # threshold 0.025
        (0.2, {BEST, SECOND, THIRD}),  # threshold 0.1 drops 0.05
        (0.5, {BEST, SECOND}),  # threshold 0.25 drops 0.15
        (0.7, {BEST}),  # threshold 0.35 drops 0.3
        (1.0, {BEST}),
    ],
)
def test_min_p_drops_tokens_below_min_p_times_max(min_p: float, allowed: set[int]) -> None:
    counts = draw(known_logits(), SamplingParams(temperature=1.0, min_p=min_p, seed=21))
    assert set(counts) == allowed


# --- log-probabilities ----------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_logits_not_the_scaled_ones() -> None:
    logits = torch.randn(32, generator=torch.Generator().manual_seed(9)) * 3  # [V]
    params = SamplingParams(temperature=2.5, top_k=4, seed=1, logprobs=5)
    token, result = sample(logits, params)
    assert isinstance(result, TokenLogprobs)
    raw = torch.log_softmax(logits, dim=-1)
    scaled = torch.log_softmax(logits / params.temperature, dim=-1)
    assert result.token_id == token
    assert result.logprob == pytest.approx(float(raw[token]), abs=1e-5)
    assert not math.isclose(result.logprob, float(scaled[token]), abs_tol=1e-3)


def test_top_logprobs_sorted_best_first_with_right_values() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(10))  # [V]
    params = SamplingParams(temperature=0.7, seed=2, logprobs=6)
    _, result = sample(logits, params)
    assert result is not None
    raw = torch.log_softmax(logits, dim=-1)
    expected_ids = torch.argsort(logits, descending=True)[:6].tolist()
    assert [tid for tid, _ in result.top] == expected_ids
    for tid, value in result.top:
        assert value == pytest.approx(float(raw[tid]), abs=1e-5)
    values = [value for _, value in result.top]
    assert values == sorted(values, reverse=True)
    assert all(isinstance(tid, int) for tid, _ in result.top)


def test_greedy_logprobs_give_the_best_token() -> None:
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0])
    token, result = sample(logits, SamplingParams(temperature=0.0, logprobs=2))
    raw = torch.log_softmax(logits, dim=-1)
    assert token == 1
    assert result is not None
    assert result.logprob == pytest.approx(float(raw[1]), abs=1e-6)
    assert [tid for tid, _ in result.top] == [1, 3]


def test_logprobs_zero_gives_chosen_token_and_no_alternatives() -> None:
    logits = known_logits()
    params = SamplingParams(temperature=1.0, seed=5, logprobs=0)
    token, result = sample(logits, params)
    assert result is not None
    assert result.top == ()
    assert result.token_id == token
    assert result.logprob == pytest.approx(math.log(KNOWN_PROBS[token]), abs=1e-5)


def test_no_logprobs_unless_asked() -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    assert sample(known_logits(), params)[1] is None

