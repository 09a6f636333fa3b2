"""Expert placement: balanced contiguous ranges, a shard-major permute order, replicas of hot experts."""

from __future__ import annotations

import pytest

from herd.workers.placement import Placement, place_experts


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


# --- the flat int form sent over a collective, and validate() -------------------------------------------------
def test_to_ints_round_trips_ranges_and_replicas():
    load = [1.0] * 16
    load[3], load[12] = 50.0, 30.0
    for placement in (place_experts(16, 4), place_experts(16, 4, expert_load=load, replicate_hot=2),
                      place_experts(7, 7), place_experts(10, 3, expert_load=list(range(10)), replicate_hot=3)):
        values = placement.to_ints()
        assert all(type(v) is int for v in values)
        assert Placement.from_ints(values) == placement
        placement.validate()


def test_from_ints_of_a_hand_made_placement_with_a_three_way_replica():
    placement = Placement(num_experts=3, shard_experts=((0, 2), (1, 2), (2,)), expert_order=(0, 2, 1),
                          replicas={0: (0,), 1: (1,), 2: (0, 1, 2)})
    assert Placement.from_ints(placement.to_ints()) == placement


def _ints(placement_kwargs=None):
    return place_experts(4, 2, **(placement_kwargs or {})).to_ints()


def _edited(edit):
    values = _ints(dict(expert_load=[5.0, 1.0, 1.0, 1.0], replicate_hot=1))
    edit(values)
    return values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "too short"),
        ([4], "too short"),
        ([0, 1], "at least one expert and one shard"),
        ([4, 0], "at least one expert and one shard"),
        (_ints()[:-1], "end early"),
        ([*_ints(), 0], "1 value.* left over"),
        (_edited(lambda v: v.__setitem__(2, 9)), "expert 9 out of range"),
        (_edited(lambda v: v.__setitem__(2, 1)), "expert_order .* not every expert once"),
    ],
)
def test_from_ints_rejects_malformed_values(values, message):
    with pytest.raises(ValueError, match=message):
        Placement.from_ints(values)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(shard_experts=((0, 1), (2,)), replicas={0: (0,), 1: (0,), 2: (1,)}), "expert 3 is held by no shard"),
        (dict(shard_experts=((0, 1), (3, 2)), replicas={0: (0,), 1: (0,), 2: (1,), 3: (1,)}), "not ascending"),
        (dict(shard_experts=((0, 1), (2, 3, 7)), replicas={0: (0,), 1: (0,), 2: (1,), 3: (1,)}),
         "expert 7 out of range"),
        (dict(shard_experts=((0, 1, 2), (2, 3)), replicas={0: (0,), 1: (0,), 2: (1,), 3: (1,)}),
         "replicas of expert 2 .* shards holding it"),
        (dict(shard_experts=((0, 1), (2, 3)), replicas={0: (0,), 1: (0,), 2: (1, 1), 3: (1,)}), "twice"),
        (dict(shard_experts=((0, 1, 2, 3), ()), replicas={0: (0,), 1: (0,), 2: (0,), 3: (0,)}),
         "shard 1 holds no experts"),
        (dict(shard_experts=((0, 1), (2, 3)), replicas={0: (0,), 1: (0,), 2: (1,), 3: (1,)},
              expert_order=(0, 2, 1, 3)), "grouped shard by shard"),
    ],
)
def test_validate_names_what_is_wrong(kwargs, message):
    placement = Placement(**{"num_experts": 4, "expert_order": (0, 1, 2, 3), **kwargs})
    with pytest.raises(ValueError, match=message):
        placement.validate()
    with pytest.raises(ValueError, match=message):
        Placement.from_ints(placement.to_ints())


def test_a_replicated_experts_rows_cover_its_run_once_and_no_copy_gets_a_single_row_of_more():
    from herd.workers.placement import copy_rows

    for size in range(0, 40):
        for copies in range(1, 6):
            pieces = [copy_rows(size, i, copies) for i in range(copies)]
            covered = [r for start, stop in pieces for r in range(start, stop)]
            assert covered == list(range(size)), (size, copies, pieces)
            lengths = [stop - start for start, stop in pieces if stop > start]
            assert size < 2 or min(lengths) >= 2, (size, copies, pieces)
            assert max(lengths, default=0) - min(lengths, default=0) <= 1 or size < 2 * copies
