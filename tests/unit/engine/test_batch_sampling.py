"""herd.engine.sampler.sample_batch against the per-row sampler it replaced, and seeded requests through the
engine whatever their batch.

Legend: B rows, V vocab. `reference_filtered` and `reference_logprobs` are the old per-row functions, kept
here verbatim as the specification the batched pass must match.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine
from herd.engine.sampler import TokenLogprobs, filtered_sorted, sample_batch, seeded_uniforms
from herd.engine.sampling_params import SamplingParams
from herd.model.tiny import make_tiny


def reference_filtered(scaled: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The old per-row filter on logits [V]: tokens top-k, top-p and min-p exclude set to -inf."""
    out = scaled.clone()
    if params.top_k and params.top_k < out.shape[-1]:
        kth = torch.topk(out, params.top_k).values[-1]
        out[out < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        out[order[drop]] = float("-inf")
    if params.min_p > 0.0:
        probs = torch.softmax(out, dim=-1)
        out[probs < params.min_p * probs.max()] = float("-inf")
    return out


def reference_logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprobs:
    """The old per-row log-probabilities of logits [V]."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top_values, top_ids = torch.topk(logprobs, n) if n else (logprobs[:0], logprobs[:0])
    top = tuple(zip(top_ids.tolist(), top_values.tolist(), strict=True))
    return TokenLogprobs(token_id=token, logprob=float(logprobs[token]), top=top)


def mixed_params(count: int, seed: int) -> list[SamplingParams]:
    """Random filter settings, each filter off in about a third of the rows."""
    rng = torch.Generator().manual_seed(seed)

    def pick(options: list[float]) -> float:
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    return [
        SamplingParams(temperature=pick([0.3, 0.7, 1.0, 1.8]), top_k=int(pick([0, 0, 1, 3, 20, 500])),
                       top_p=pick([1.0, 1.0, 0.2, 0.5, 0.9, 0.99]), min_p=pick([0.0, 0.0, 0.01, 0.1, 0.6]))
        for _ in range(count)
    ]


@pytest.mark.parametrize(("seed", "all_top_k"), [(0, False), (1, False), (2, False), (3, True), (4, True)])
def test_filters_equal_the_per_row_function(seed: int, all_top_k: bool) -> None:
    """Mixed settings sort every token; when every row has a top-k only the largest k are sorted (width)."""
    params = mixed_params(48, seed)
    if all_top_k:
        params = [dataclasses.replace(p, top_k=min(p.top_k or 40, 40)) for p in params]
    logits = torch.randn(48, 300, generator=torch.Generator().manual_seed(100 + seed)) * 3  # [B, V]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    sorted_logits, order = filtered_sorted(
        scaled, top_k=torch.tensor([p.top_k for p in params]), top_p=torch.tensor([p.top_p for p in params]),
        min_p=torch.tensor([p.min_p for p in params]), width=max(p.top_k for p in params) if all_top_k else 300,
    )
    assert sorted_logits.shape == order.shape == (48, 40 if all_top_k else 300)
    batched = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)  # back in vocab order
    for row, p in enumerate(params):
        expected = reference_filtered(scaled[row], p)
        assert torch.equal(batched[row].isinf(), expected.isinf()), f"row {row}: {p}"
        kept = ~expected.isinf()
        assert torch.equal(batched[row][kept], expected[kept])
    assert any((~batched[row].isinf()).sum() not in (1, 300) for row in range(48))  # filters that cut midway


def test_logprobs_equal_the_per_row_function() -> None:
    logits = torch.randn(6, 80, generator=torch.Generator().manual_seed(5)) * 4  # [B, V]
    asked = [None, 0, 3, 20, None, 1]
    params = [SamplingParams(temperature=t, logprobs=n, seed=9) for t, n in zip([0, 1, 0.5, 0, 2, 1], asked,
                                                                               strict=True)]
    tokens, results = sample_batch(logits, params, positions=[0] * 6, generator=torch.Generator().manual_seed(0))
    for row, n in enumerate(asked):
        if n is None:
            assert results[row] is None
        else:
            assert results[row] == reference_logprobs(logits[row], tokens[row], n)


def test_greedy_rows_take_the_argmax_and_sampled_rows_only_allowed_tokens() -> None:
    logits = torch.randn(64, 200, generator=torch.Generator().manual_seed(8)) * 2  # [B, V]
    params = [SamplingParams(temperature=0.0) if row % 3 == 0 else mixed_params(1, row)[0] for row in range(64)]
    tokens, _ = sample_batch(logits, params, positions=list(range(64)), generator=torch.Generator().manual_seed(1))
    for row, p in enumerate(params):
        if p.greedy:
            assert tokens[row] == int(torch.argmax(logits[row]))
        else:
            assert not reference_filtered(logits[row] / p.temperature, p)[tokens[row]].isinf(), f"row {row}"
    assert all(isinstance(t, int) for t in tokens)


def test_sampled_frequencies_follow_the_softmax() -> None:
    """4,000 seeded draws (positions 0..3,999 of one request) from fixed logits: each token's frequency is
    within 4.5 standard deviations of its softmax probability (a fixed seed, so it is not flaky)."""
    n = 4000
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -3.0, 1.5, 0.2])  # [V]
    probs = torch.softmax(logits, dim=-1)
    params = [SamplingParams(temperature=1.0, seed=2024)] * n
    tokens, _ = sample_batch(logits.expand(n, -1), params, positions=list(range(n)), generator=None)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double()
    sigma = (probs * (1 - probs) / n).sqrt().double()
    assert ((counts / n - probs.double()).abs() <= 4.5 * sigma).all(), (counts / n, probs)


def test_unseeded_rows_follow_the_softmax_and_the_generator() -> None:
    n = 4000
    logits = torch.tensor([0.3, -0.5, 1.2, 0.0])  # [V]
    params = [SamplingParams(temperature=1.0)] * n
    first, _ = sample_batch(logits.expand(n, -1), params, positions=[0] * n, generator=torch.Generator().manual_seed(3))
    again, _ = sample_batch(logits.expand(n, -1), params, positions=[0] * n, generator=torch.Generator().manual_seed(3))
    other, _ = sample_batch(logits.expand(n, -1), params, positions=[0] * n, generator=torch.Generator().manual_seed(4))
    assert first == again != other
    probs = torch.softmax(logits, dim=-1).double()
    counts = torch.bincount(torch.tensor(first), minlength=len(logits)).double()
    assert ((counts / n - probs).abs() <= 4.5 * (probs * (1 - probs) / n).sqrt()).all()


def test_a_seeded_row_draws_the_same_whatever_its_batch() -> None:
    """The same request at the same position gets the same token alone, at another row, among other rows,
    whatever the generator's state."""
    logits = torch.randn(10, 500, generator=torch.Generator().manual_seed(6)) * 0.1  # nearly uniform rows
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=77)
    alone = [sample_batch(logits[:1], [seeded], [pos], torch.Generator().manual_seed(pos))[0][0] for pos in range(10)]
    for row in (3, 9):
        batch = logits.clone()
        batch[row] = logits[0]
        others = mixed_params(10, row)
        for pos in range(10):
            params = [*others[:row], seeded, *others[row + 1 :]]
            tokens, _ = sample_batch(batch, params, [pos + 5] * row + [pos] + [1] * (9 - row),
                                     torch.Generator().manual_seed(1000 + pos))
            assert tokens[row] == alone[pos], f"row {row}, position {pos}"
    assert len(set(alone)) > 5  # it does move with the position


def test_seeded_uniforms_depend_on_every_bit_of_the_seed_and_the_position() -> None:
    seeds = [0, 1, 2**32, 2**63, 2**64 - 1, 2**64 - 2, 12345]
    u = seeded_uniforms(seeds, [0] * len(seeds), torch.device("cpu"))
    assert u.dtype == torch.float32 and ((u >= 0) & (u < 1)).all()
    assert len(set(u.tolist())) == len(seeds)
    along = seeded_uniforms([7] * 2000, list(range(2000)), torch.device("cpu"))  # [2000]
    assert len(set(along.tolist())) > 1990
    assert abs(float(along.mean()) - 0.5) < 0.02  # uniform: mean 0.5, sd of the mean 0.0065
    assert torch.equal(seeded_uniforms([7], [1999], torch.device("cpu")), along[-1:])


def test_top_k_beyond_the_vocab_and_int64_keeps_everything_top_p_allows() -> None:
    logits = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]] * 400))  # [B, V]
    params = [SamplingParams(top_k=2**70, top_p=0.6, seed=1)] * 400
    tokens, _ = sample_batch(logits, params, list(range(400)), None)
    assert set(tokens) == {1, 3}


def test_rows_params_and_positions_must_agree() -> None:
    with pytest.raises(ValueError, match="3 rows"):
        sample_batch(torch.zeros(3, 4), [SamplingParams()] * 2, [0, 0], None)


@pytest.fixture(scope="module")
def scout(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=2))


def test_seeded_request_repeats_at_any_batch_position_through_the_engine(scout: str) -> None:
    engine = LLMEngine.from_pretrained(scout, EngineConfig(kv_cache_mb=16, max_num_seqs=32))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 60, (5,), generator=g)]
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=4321, max_tokens=10, ignore_eos=True)
    alone = engine.generate([prompts[0]], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=10), SamplingParams(temperature=0.0, max_tokens=6),
              SamplingParams(temperature=0.8, seed=5, min_p=0.05, max_tokens=10, logprobs=2)]
    middle = engine.generate([prompts[1], prompts[2], prompts[0], prompts[3]],
                             [others[0], others[1], seeded, others[2]])
    last = engine.generate([prompts[4], prompts[3], prompts[0]], [others[2], others[0], seeded])
    assert middle[2].token_ids == last[2].token_ids == alone
    assert len(set(alone)) > 3
