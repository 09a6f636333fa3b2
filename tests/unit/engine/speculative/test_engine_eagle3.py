"""EAGLE-3 through the engine: with the tiny random head (which drafts almost nothing the target accepts) and
with a head whose drafts are replaced by the answer, the tokens equal plain decoding's on both presets, KV blocks
all come back, and a head that does not fit the target is refused when the engine is made."""

from __future__ import annotations

import json

import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.eagle3 import Eagle3Proposer
from herd.model.tiny import make_tiny
from herd.model.tiny_eagle3 import make_tiny_eagle3

SMALL = dict(kv_cache_mb=16, max_num_seqs=32, block_size=4, max_num_batched_tokens=40)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def tiny(request, tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp(request.param), preset=request.param, seed=6)
    return path, make_tiny_eagle3(path, seed=6)


def _prompts(count, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 400, (int(n),), generator=g).tolist()
            for n in torch.randint(3, 50, (count,), generator=g)]


def _idle(engine):
    return all(pool.num_free == pool.num_blocks for pool in engine.kv.pools.values())


def test_eagle3_greedy_tokens_equal_plain_decoding(tiny):
    path, head = tiny
    prompts = _prompts(16, 0)
    params = [SamplingParams(temperature=0, max_tokens=1 + (5 * i) % 32, ignore_eos=True) for i in range(16)]
    expected = LLMEngine.from_pretrained(path, EngineConfig(**SMALL)).generate(prompts, params)
    config = SpeculativeConfig(method="eagle3", num_tokens=3, draft_path=str(head))
    engine = LLMEngine.from_pretrained(path, EngineConfig(**SMALL, speculative=config))
    assert isinstance(engine.speculator.proposer, Eagle3Proposer)
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert engine.stats().draft_tokens > 50  # the head drafted and the engine verified
    assert _idle(engine)


def test_eagle3_drafts_that_are_right_are_accepted_and_keep_the_tokens(tiny, monkeypatch):
    """The head's machinery (catch-up over the target's hidden states every step) runs as usual, but its drafts
    are swapped for the answer: acceptance is then high and the tokens still the plain ones."""
    path, head = tiny
    prompts = _prompts(8, 1)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = LLMEngine.from_pretrained(path, EngineConfig(**SMALL)).generate(prompts, params)
    answers = {tuple(p): o.token_ids for p, o in zip(prompts, expected, strict=True)}
    real = Eagle3Proposer.propose
    calls = []

    def answering(self, step, wanted):
        drafted = real(self, step, wanted)
        calls.append(sum(map(len, drafted)))
        return [answers[tuple(seq.prompt_ids)][len(seq.output_ids) : len(seq.output_ids) + k] for seq, k in wanted]

    monkeypatch.setattr(Eagle3Proposer, "propose", answering)
    config = SpeculativeConfig(method="eagle3", num_tokens=3, draft_path=str(head))
    engine = LLMEngine.from_pretrained(path, EngineConfig(**SMALL, speculative=config))
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    stats = engine.stats()
    assert stats.accepted_tokens > 0.8 * stats.draft_tokens > 0
    assert sum(calls) > 0
    assert _idle(engine)


def test_a_head_that_does_not_fit_the_target_is_refused_when_the_engine_is_made(tiny, tmp_path):
    path, head = tiny
    config = json.loads((head / "config.json").read_text())
    config["hidden_size"] *= 2
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").write_bytes((head / "model.safetensors").read_bytes())
    speculative = SpeculativeConfig(method="eagle3", draft_path=str(bad))
    with pytest.raises(ValueError, match="hidden"):
        LLMEngine.from_pretrained(path, EngineConfig(**SMALL, speculative=speculative))


def test_the_heads_kv_layer_is_counted_in_the_kv_budget(tiny):
    path, head = tiny
    plain = LLMEngine.from_pretrained(path, EngineConfig(**SMALL))
    config = SpeculativeConfig(method="eagle3", draft_path=str(head))
    engine = LLMEngine.from_pretrained(path, EngineConfig(**SMALL, speculative=config))
    layout, reference = engine.kv.layout, plain.kv.layout
    cache = engine.runner.cache
    layer = engine.speculator.proposer.layer
    head_bytes = 2 * cache.k[layer][0].numel() * cache.k[layer].element_size()  # one block's keys and values
    assert layout.bytes_per_block["full"] == reference.bytes_per_block["full"] + head_bytes
    assert layout.num_blocks["full"] < reference.num_blocks["full"]
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    scratch = sum(t[0].numel() * t.element_size() for t in cache.k + cache.v)  # one scratch block per layer
    assert held - scratch <= engine.config.kv_cache_bytes
