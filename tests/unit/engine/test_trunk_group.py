"""A group of trunks' engines driven as one (experts in each trunk here: the lockstep over shards is
tests/integration/workers/test_trunk_group.py): requests spread by KV in use, stats summed, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.stats import EngineStats
from herd.engine.trunk_group import TrunkGroup, combined
from herd.model.tiny import make_tiny

CONFIG = dict(kv_cache_mb=8, max_num_seqs=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=2)


def _group(tiny, trunks: int = 2, **config) -> TrunkGroup:
    return TrunkGroup([LLMEngine.from_pretrained(tiny, EngineConfig(**CONFIG, **config)) for _ in range(trunks)])


def test_stats_of_several_engines_are_summed_and_a_hold_anywhere_is_the_groups():
    one = EngineStats(running=1, waiting=2, kv_blocks={"full": 8, "chunked": 4}, kv_blocks_used={"full": 3,
                      "chunked": 1}, prefix_queried_tokens=10, prefix_hit_tokens=4, preemptions=1,
                      fault_last_recovery_s=2.0)
    two = dataclasses.replace(one, running=3, kv_blocks_used={"full": 5, "chunked": 0}, fault_held=True,
                              fault_last_recovery_s=5.0)
    both = combined([one, two])
    assert (both.running, both.waiting, both.preemptions) == (4, 4, 2)
    assert both.kv_blocks == {"full": 16, "chunked": 8} and both.kv_blocks_used == {"full": 8, "chunked": 1}
    assert both.kv_blocks_held == 9 and both.fault_held and both.fault_last_recovery_s == 5.0


def test_requests_spread_over_the_trunks_and_their_outputs_are_each_engines(tiny):
    group = _group(tiny)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    prompts = [[3 + i, 40 + i, 7, 9, 11 + i] for i in range(4)]
    try:
        expected = [LLMEngine.from_pretrained(tiny, EngineConfig(**CONFIG)).generate([p], greedy)[0].token_ids
                    for p in prompts]
        ids = []
        for prompt in prompts:  # one at a time, a step between: each goes where the least KV is held
            ids.append(group.add_request(prompt, greedy))
            group.step()
        assert [group.trunk_of(rid) for rid in ids] == [0, 1, 0, 1]
        final = {}
        while group.has_unfinished():
            final.update((out.request_id, out) for out in group.step() if out.finished)
        assert [final[rid].token_ids for rid in ids] == expected
        assert group.stats().kv_blocks_held == 0 and all(group.trunk_of(rid) is None for rid in ids)
    finally:
        group.close()


def test_an_id_is_the_groups_and_a_request_not_prepared_here_is_refused(tiny):
    group = _group(tiny)
    try:
        rid = group.add_request([5, 6, 7], SamplingParams(max_tokens=2))
        assert rid.startswith("req-") and group.abort(rid) and not group.abort("nobody")
        foreign = LLMEngine.from_pretrained(tiny, EngineConfig(**CONFIG)).prepare([5, 6], SamplingParams(),
                                                                          request_id="elsewhere")
        with pytest.raises(ValueError, match="not prepared by this trunk group"):
            group.submit(foreign)
    finally:
        group.close()


def test_engines_that_cannot_step_in_lockstep_are_refused(tiny):
    with pytest.raises(ValueError, match="lockstep"):
        _group(tiny, async_scheduling=True)
    with pytest.raises(ValueError, match="at least one engine"):
        TrunkGroup([])
