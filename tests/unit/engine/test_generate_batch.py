"""LLMEngine.generate over a batch: only its own requests count, a shared request id is refused before
anything is queued, and per-prompt SamplingParams may be any sequence (three bugs mypy --strict found)."""

from __future__ import annotations

import collections

import pytest

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.model.tiny import make_tiny


def params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=2)
    return LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, max_num_seqs=32))


def test_a_request_queued_before_the_batch_does_not_end_it(engine):
    engine.add_request([5, 6, 7], params(1), request_id="early")  # finishes during the batch
    outs = engine.generate([[1, 2, 3], [4, 5, 6]], [params(2), params(6)])
    assert [len(o.token_ids) for o in outs] == [2, 6]
    engine.step()
    assert not engine.has_unfinished()


def test_one_request_id_for_several_prompts_is_refused_before_anything_is_queued(engine):
    with pytest.raises(ValueError, match="names one request"):
        engine.generate([[1, 2], [3, 4]], params(4), request_id="x")
    assert not engine.has_unfinished() and engine.stats().kv_blocks_held == 0
    (out,) = engine.generate([1, 2, 3], params(4), request_id="solo")
    assert out.request_id == "solo"


def test_per_prompt_params_may_be_any_sequence(engine):
    outs = engine.generate([[1, 2], [3, 4]], collections.UserList([params(2), params(3)]))
    assert [len(o.token_ids) for o in outs] == [2, 3]
