"""At temperature 1, speculative sampling draws from the model's own distribution: a chi-square test over many
samples cannot tell it from plain sampling, and does tell apart an acceptance rule that is deliberately biased
(the test can fail). Unseeded draws from fixed engine generator seeds, so the test is deterministic."""

from __future__ import annotations

import collections

import pytest
import torch

import herd.engine.llm_engine as llm_engine
from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.speculator import Speculator
from herd.model.tiny import make_tiny

SAMPLES = 1000
PROMPT = [1, 17, 33, 91, 140, 7, 260, 55]
PARAMS = SamplingParams(temperature=1.0, top_k=3, max_tokens=4, ignore_eos=True)  # 3 choices a token: few cells
CONFIG = dict(kv_cache_mb=32, max_num_seqs=64, max_num_batched_tokens=512)


class FixedDrafts:
    """Drafts the given tokens after the first output token (what the greedy run made there)."""

    aux_layers: tuple[int, ...] = ()

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def propose(self, step, wanted):
        return [self.tokens[len(seq.output_ids) - 1 :][:k] for seq, k in wanted]

    def forget(self, seq) -> None:
        pass


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=5)


@pytest.fixture(scope="module")
def plain(path):
    """Plain sampling's counts, the baseline of both tests."""
    return _samples(path, speculative=False, seed=1)[0]


def _samples(path, *, speculative: bool, seed: int) -> tuple[collections.Counter, int]:
    """Counts of (2nd, 3rd) output tokens over SAMPLES requests, and the drafts accepted."""
    config = SpeculativeConfig(method="ngram", num_tokens=2)
    engine = LLMEngine.from_pretrained(path, EngineConfig(**CONFIG, speculative=config if speculative else None))
    if speculative:
        greedy = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
        engine.speculator = Speculator(config, FixedDrafts(greedy.token_ids[1:]))
    engine._generator.manual_seed(seed)
    outs = engine.generate([PROMPT] * SAMPLES, PARAMS)
    return collections.Counter(tuple(o.token_ids[1:3]) for o in outs), engine.stats().accepted_tokens


def _p_value(a: collections.Counter, b: collections.Counter) -> float:
    """Two-sample chi-square test of homogeneity; cells expected below 5 in either sample are pooled."""
    cells = sorted(set(a) | set(b))
    total_a, total_b = sum(a.values()), sum(b.values())
    share_a = total_a / (total_a + total_b)
    pooled = (0, 0)
    table = []
    for cell in cells:
        n = a[cell] + b[cell]
        if min(n * share_a, n * (1 - share_a)) < 5:
            pooled = (pooled[0] + a[cell], pooled[1] + b[cell])
        else:
            table.append((a[cell], b[cell]))
    if sum(pooled):
        table.append(pooled)
    stat = 0.0
    for x, y in table:
        n = x + y
        for observed, expected in ((x, n * share_a), (y, n * (1 - share_a))):
            stat += (observed - expected) ** 2 / expected
    dof = len(table) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_speculative_sampling_cannot_be_told_from_plain_sampling(path, plain):
    speculative, accepted = _samples(path, speculative=True, seed=2)
    assert accepted > SAMPLES // 10  # drafts were taken: the test looks at something
    assert len(plain) >= 4  # a distribution, not a point
    assert _p_value(plain, speculative) > 0.01
    other, _ = _samples(path, speculative=False, seed=3)  # the test's own calibration: plain against plain
    assert _p_value(plain, other) > 0.01


def test_a_biased_acceptance_rule_is_told_apart(path, plain, monkeypatch):
    # Keep the first draft whatever the model sampled there: more of the draft's tokens than the model makes.
    real = llm_engine.accepted_count
    monkeypatch.setattr(llm_engine, "accepted_count", lambda drafts, sampled: max(real(drafts, sampled),
                                                                                 min(1, len(drafts))))
    biased, _ = _samples(path, speculative=True, seed=2)
    assert _p_value(plain, biased) < 1e-6
