"""The split of a step into micro-batches (runs of chunks about equal in tokens), and the engine with ping-pong
micro-batches giving the tokens it gives with whole steps."""

from __future__ import annotations

import pydantic
import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.micro_batching import split_chunks
from herd.engine.prompt_images import ImageInput
from herd.engine.speculative.config import SpeculativeConfig
from herd.engine.speculative.speculator import Speculator
from herd.model.tiny import make_tiny
from tests.unit.engine.speculative.oracle import OracleProposer


def test_runs_are_consecutive_non_empty_and_about_equal_in_tokens():
    assert split_chunks([1] * 8, 2) == [range(0, 4), range(4, 8)]
    assert split_chunks([100, 1, 1, 1], 2) == [range(0, 1), range(1, 4)]
    assert split_chunks([1, 1, 1, 100], 2) == [range(0, 3), range(3, 4)]
    assert split_chunks([3, 3, 3, 3, 3], 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert split_chunks([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_chunks([5], 2) == [range(0, 1)]
    assert split_chunks([], 2) == []
    assert split_chunks([2, 2, 2], 1) == [range(0, 3)]
    for tokens in ([7, 1, 9, 2, 2, 30, 1], [1] * 33, [64, 1, 1]):
        for parts in (2, 3, 4):
            runs = split_chunks(tokens, parts)
            assert [i for run in runs for i in run] == list(range(len(tokens)))
            assert all(len(run) for run in runs) and len(runs) == min(parts, len(tokens))
    with pytest.raises(ValueError, match="at least 1"):
        split_chunks([1], 0)


def test_micro_batches_are_refused_with_the_padded_decode_path():
    with pytest.raises(pydantic.ValidationError, match="micro_batches > 1"):
        EngineConfig(micro_batches=2, static_decode=True)
    assert not EngineConfig(micro_batches=2, device="cpu").use_static_decode


def _counting(forward, counts: list[int]):
    def counted(batches, **kwargs):
        counts.append(len(batches))
        return forward(batches, **kwargs)

    return counted


@pytest.mark.parametrize("preset", ["scout", "maverick"])
def test_ping_pong_steps_give_the_tokens_of_whole_steps(tmp_path, preset):
    path = make_tiny(tmp_path / preset, preset=preset, seed=3)
    prompts = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 40, 17, 9, 26, 5)]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=11)
    outputs = {}
    for parts in (1, 2, 3):
        engine = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, max_num_seqs=8, micro_batches=parts,
                                                              max_num_batched_tokens=64))
        split_steps: list[int] = []
        engine.model.forward_micro_batches = _counting(engine.model.forward_micro_batches, split_steps)
        outputs[parts] = (engine.generate(prompts, greedy), engine.generate(prompts, seeded))
        assert (max(split_steps) == parts) if parts > 1 else not split_steps  # the steps really were split
        assert engine.stats().kv_blocks_held == 0  # every block back
    for parts in (2, 3):
        for whole, split in zip(outputs[1][0] + outputs[1][1], outputs[parts][0] + outputs[parts][1], strict=True):
            assert split.token_ids == whole.token_ids
        for whole, split in zip(outputs[1][0], outputs[parts][0], strict=True):  # logprobs: rounding only
            assert whole.logprobs and split.logprobs
            for a, b in zip(whole.logprobs, split.logprobs, strict=True):
                assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert abs(a.logprob - b.logprob) < 1e-4


def test_ping_pong_steps_carry_images_and_prompt_logprobs(tmp_path):
    """Micro-batches lay out their own images (a chunk boundary inside an image) and prompt rows: the same tokens,
    prompt logprobs and image-dependent text as whole steps."""
    path = make_tiny(tmp_path / "vision", preset="scout", seed=3)
    placeholder = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16)).model.config.image_token_id
    pixels = torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with_image = [5, 6, 7] + [placeholder] * 144 + [8, 9]
    texts = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (30, 9, 21)]
    scored = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    results = {}
    for parts in (1, 2):
        engine = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, max_num_seqs=8, micro_batches=parts,
                                                              max_num_batched_tokens=64))
        for text in texts:
            engine.add_request(text, scored)
        engine.add_request(with_image, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           images=[ImageInput(pixels)])
        finished = {}
        while engine.has_unfinished():
            finished.update({out.request_id: out for out in engine.step() if out.finished})
        results[parts] = [finished[rid] for rid in sorted(finished)]
    assert sum(1 for out in results[2] if out.prompt_logprobs) == len(texts)
    for whole, split in zip(results[1], results[2], strict=True):
        assert split.token_ids == whole.token_ids
        assert (whole.prompt_logprobs is None) == (split.prompt_logprobs is None)
        for a, b in zip(whole.prompt_logprobs or [], split.prompt_logprobs or [], strict=True):
            if a is None:
                assert b is None
                continue
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4


def test_ping_pong_steps_verify_drafts_exactly(tmp_path):
    """A verifying step's chunks end with their drafts (an oracle's, some corrupted): split over micro-batches, the
    accepted tokens are still the plain greedy ones."""
    path = make_tiny(tmp_path / "spec", preset="scout", seed=3)
    prompts = [torch.randint(5, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 30, 15)]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16)).generate(prompts, greedy)
    ngram = SpeculativeConfig(method="ngram", num_tokens=4)
    engine = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, micro_batches=2, speculative=ngram))
    references = {tuple(p): o.token_ids for p, o in zip(prompts, plain, strict=True)}
    engine.speculator = Speculator(ngram, OracleProposer(references, vocab=engine.model.config.vocab_size))
    split_steps: list[int] = []
    engine.model.forward_micro_batches = _counting(engine.model.forward_micro_batches, split_steps)
    drafted = engine.generate(prompts, greedy)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert split_steps and engine.stats().draft_tokens > 0
