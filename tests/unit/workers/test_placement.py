"""Expert placement: balanced contiguous ranges, a shard-major permute order, replicas of hot experts."""

from __future__ import annotations

import pytest

from herd.workers.placement import place_experts


@pytest.mark.parametrize(("experts", "shards"), [(16, 1), (16, 2), (16, 3), (128, 8), (7, 7), (10, 4)])
def test_balanced_contiguous_ranges_in_shard_order(experts, shards):
    placement = place_experts(experts, shards)
    sizes = [len(owned) for owned in placement.shard_experts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == experts
    assert placement.expert_order == tuple(range(experts))
    flat = [e for owned in placement.shard_experts for e in owned]
    assert flat == list(range(experts)), "each shard's experts are one contiguous run of the order"
    assert all(len(holders) == 1 for holders in placement.replicas.values())


def test_hot_experts_get_a_replica_on_the_least_loaded_other_shard():
    load = [1.0] * 16
    load[3], load[12] = 50.0, 30.0
    placement = place_experts(16, 4, expert_load=load, replicate_hot=2)
    assert placement.replicas[3][0] == 0 and placement.replicas[12][0] == 3
    assert placement.replicas[3][1] != 0 and placement.replicas[12][1] != 3
    assert placement.replicas[3][1] != placement.replicas[12][1], "the second replica goes where load is now least"
    for expert, holders in placement.replicas.items():
        for shard in holders:
            assert expert in placement.shard_experts[shard]
    assert sorted(placement.expert_order) == list(range(16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_experts=4, num_shards=5), "5 shards for 4 experts"),
        (dict(num_experts=0, num_shards=1), "at least one"),
        (dict(num_experts=8, num_shards=2, replicate_hot=1), "needs expert_load"),
        (dict(num_experts=8, num_shards=1, replicate_hot=1, expert_load=[1.0] * 8), "2\\+ shards"),
        (dict(num_experts=8, num_shards=2, expert_load=[1.0] * 7), "7 entries for 8"),
    ],
)
def test_impossible_placements_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        place_experts(**kwargs)
