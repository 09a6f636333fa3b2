"""Live expert balancing: the planned placement, rows per shard by the dispatcher's split, weight transfers."""

from __future__ import annotations

import random

import pytest

from herd.workers.balance import Transfer, expected_shard_rows, plan_placement, rebalance, shard_rows, transfers
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.placement import Placement, place_experts


def _skewed(num_experts: int, rng: random.Random) -> list[float]:
    """A few hot experts over a Zipf-like tail, in random expert positions."""
    load = [1000.0 / (rank + 1) ** 1.2 for rank in range(num_experts)]
    rng.shuffle(load)
    return load


def _random_load(num_experts: int, rng: random.Random) -> list[float]:
    kind = rng.randrange(4)
    if kind == 0:
        return [0.0] * num_experts
    if kind == 1:
        return [float(rng.randrange(5)) for _ in range(num_experts)]  # many ties
    if kind == 2:
        return _skewed(num_experts, rng)
    return [rng.random() * 100 for _ in range(num_experts)]


def _cases(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        experts = rng.randint(1, 40)
        shards = rng.randint(1, 9)
        slots = rng.randint(max(1, -(-experts // shards)), -(-experts // shards) + 4)
        yield _random_load(experts, rng), shards, slots


@pytest.mark.parametrize("seed", range(4))
def test_planned_placements_are_valid_and_respect_the_slots(seed):
    for load, shards, slots in _cases(150, seed):
        placement = plan_placement(load, shards, slots_per_shard=slots)
        placement.validate()  # every expert held, shards ascending, replicas consistent, permute order grouped
        assert placement.num_experts == len(load) and placement.num_shards == shards
        assert all(1 <= len(held) <= slots for held in placement.shard_experts)
        assert Placement.from_ints(placement.to_ints()) == placement
        used = sum(len(held) for held in placement.shard_experts)
        assert used == min(slots * shards, len(load) * shards), "every spare slot is given to a copy"


def test_planning_is_deterministic_and_ties_go_by_id():
    load = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    first = plan_placement(load, 2, slots_per_shard=4)
    assert first == plan_placement(list(load), 2, slots_per_shard=4)
    assert first.replicas[0] == (0, 1) and first.replicas[1] == (0, 1), "the two spares go to experts 0 and 1"
    assert [len(first.replicas[e]) for e in range(2, 6)] == [1, 1, 1, 1]


def test_the_greedy_lowers_the_slowest_shard_against_static_ranges_on_a_skewed_load():
    rng = random.Random(7)
    for experts, shards in [(16, 2), (16, 4), (128, 8), (128, 4)]:
        load = _skewed(experts, rng)
        static = max(expected_shard_rows(place_experts(experts, shards), load))
        slots = experts // shards + 2
        balanced = max(expected_shard_rows(plan_placement(load, shards, slots_per_shard=slots), load))
        ideal = sum(load) / shards
        assert balanced < 0.8 * static, (experts, shards, static, balanced)
        assert balanced <= 1.15 * ideal, (experts, shards, balanced, ideal)


def test_one_hot_expert_is_split_over_every_shard_when_slots_allow():
    load = [100.0, 1.0, 1.0, 1.0]
    placement = plan_placement(load, 4, slots_per_shard=2)
    assert sorted(placement.replicas[0]) == [0, 1, 2, 3]
    assert max(expected_shard_rows(placement, load)) == pytest.approx(26.0)


def test_no_spare_slots_places_each_expert_once_by_load():
    load = [8.0, 7.0, 1.0, 1.0]
    placement = plan_placement(load, 2, slots_per_shard=2)
    assert all(len(holders) == 1 for holders in placement.replicas.values())
    assert sorted(expected_shard_rows(placement, load)) == [8.0, 9.0]


@pytest.mark.parametrize(
    ("load", "shards", "slots", "message"),
    [
        ([1.0] * 9, 2, 4, "4 slots on each of 2 shards hold 8 experts, not 9"),
        ([], 2, 4, "at least one expert"),
        ([1.0] * 4, 0, 4, "at least one shard"),
        ([1.0, -1.0], 2, 1, "expert 1 has load -1.0"),
        ([1.0, float("nan")], 2, 1, "expert 1 has load nan"),
    ],
)
def test_impossible_plans_raise(load, shards, slots, message):
    with pytest.raises(ValueError, match=message):
        plan_placement(load, shards, slots_per_shard=slots)


# --- rows per shard, by exactly the dispatcher's split ----------------------------------------------------------
class _Shards:
    """The one thing ExpertDispatcher asks a transport at construction: what each shard serves."""

    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    def shard_experts(self) -> list[tuple[int, ...]]:
        return list(self.placement.shard_experts)


@pytest.mark.parametrize("seed", range(3))
def test_shard_rows_match_the_dispatchers_slices(seed):
    rng = random.Random(seed)
    for load, shards, slots in _cases(100, seed + 100):
        placement = plan_placement(load, shards, slots_per_shard=slots)
        rows = [rng.choice([0, 1, 2, 3, 7, rng.randrange(200)]) for _ in load]
        dispatcher = ExpertDispatcher(placement, _Shards(placement))  # type: ignore[arg-type]
        bounds = [0]
        for expert in placement.expert_order:
            bounds.append(bounds[-1] + rows[expert])
        expected = [sum(b - a for a, b in dispatcher._slices(shard, bounds)) for shard in range(shards)]
        assert shard_rows(placement, rows) == expected
        assert sum(expected) == sum(rows)


def test_shard_rows_split_a_replicated_expert_unevenly_as_integers():
    placement = Placement(num_experts=2, shard_experts=((0, 1), (0,), (0,)), expert_order=(0, 1),
                          replicas={0: (0, 1, 2), 1: (0,)})
    assert shard_rows(placement, [7, 1]) == [2 + 1, 2, 3]  # 7 rows: 7*1//3=2, 7*2//3=4, 7 -> 2, 2, 3


def test_shard_rows_rejects_counts_of_the_wrong_length():
    with pytest.raises(ValueError, match="3 row counts for 4 experts"):
        shard_rows(place_experts(4, 2), [1, 2, 3])


# --- weight transfers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_transfers_are_complete_and_minimal(seed):
    rng = random.Random(seed)
    for _ in range(100):
        experts, shards = rng.randint(2, 30), rng.randint(1, 6)
        slots = -(-experts // shards) + rng.randrange(3)
        old = plan_placement(_random_load(experts, rng), shards, slots_per_shard=slots)
        new = plan_placement(_random_load(experts, rng), shards, slots_per_shard=slots)
        moves = transfers(old, new)
        wanted = {(e, t) for t, held in enumerate(new.shard_experts) for e in held if e not in old.shard_experts[t]}
        assert {(m.expert, m.target) for m in moves} == wanted and len(moves) == len(wanted)
        assert all(m.source in old.replicas[m.expert] and m.source != m.target for m in moves)
        assert moves == transfers(old, new), "deterministic"
        assert transfers(new, new) == []


def test_transfers_spread_sends_over_the_sources():
    old = Placement(num_experts=2, shard_experts=((0, 1), (0, 1), (), ()), expert_order=(0, 1),
                    replicas={0: (0, 1), 1: (0, 1)})
    new = Placement(num_experts=2, shard_experts=((0,), (1,), (0,), (1,)), expert_order=(0, 1),
                    replicas={0: (0, 2), 1: (1, 3)})
    assert transfers(old, new) == [Transfer(expert=0, source=0, target=2), Transfer(expert=1, source=1, target=3)]


def test_transfers_between_different_shapes_raise():
    with pytest.raises(ValueError, match="8 experts on 2 shards to 8 experts on 4"):
        transfers(place_experts(8, 2), place_experts(8, 4))
    with pytest.raises(ValueError, match="8 experts on 2 shards to 6 experts on 2"):
        transfers(place_experts(8, 2), place_experts(6, 2))


# --- rebalance: move only when it pays --------------------------------------------------------------------------
def test_rebalance_returns_the_plan_when_it_lowers_the_slowest_shard_enough():
    load = [100.0] + [1.0] * 15
    current = place_experts(16, 4)
    planned = rebalance(load, current, slots_per_shard=5)
    assert planned is not None
    assert planned == plan_placement(load, 4, slots_per_shard=5)
    assert max(expected_shard_rows(planned, load)) <= 0.9 * max(expected_shard_rows(current, load))


def test_rebalance_keeps_a_placement_that_is_already_balanced():
    load = [10.0] * 16
    assert rebalance(load, place_experts(16, 4), slots_per_shard=5) is None
    skewed = [100.0] + [1.0] * 15
    balanced = plan_placement(skewed, 4, slots_per_shard=5)
    assert rebalance(skewed, balanced, slots_per_shard=5) is None
    assert rebalance([0.0] * 16, place_experts(16, 4), slots_per_shard=5) is None


def test_rebalance_min_gain_is_the_fraction_the_slowest_shard_must_drop():
    load = [12.0, 10.0, 10.0, 8.0]  # static ranges: shards at 22 and 18; planned: 20 and 20 (a 9% drop)
    current = place_experts(4, 2)
    assert rebalance(load, current, slots_per_shard=2, min_gain=0.1) is None
    assert rebalance(load, current, slots_per_shard=2, min_gain=0.05) is not None


def test_rebalance_checks_its_arguments():
    with pytest.raises(ValueError, match="min_gain"):
        rebalance([1.0] * 4, place_experts(4, 2), slots_per_shard=2, min_gain=1.5)
    with pytest.raises(ValueError, match="3 loads for 4 experts"):
        rebalance([1.0] * 3, place_experts(4, 2), slots_per_shard=2)


def test_rebalance_judges_a_plan_layer_by_layer_when_given_the_layers():
    from herd.workers.balance import expected_shard_rows

    current = place_experts(16, 4)
    first, second = [1.0] * 16, [1.0] * 16
    first[0], second[15] = 100.0, 100.0  # each layer's hot expert on another shard
    summed = [a + b for a, b in zip(first, second, strict=True)]
    planned = rebalance(summed, current, slots_per_shard=5)
    judged = rebalance(summed, current, slots_per_shard=5, layer_loads=[first, second])
    assert planned is not None
    if judged is not None:
        for load in (first, second):
            assert max(expected_shard_rows(judged, load)) <= max(expected_shard_rows(current, load))
    lopsided = [[0.0] * 16, [0.0] * 16]
    lopsided[0][0] = 500.0
    assert rebalance([500.0] + [0.0] * 15, current, slots_per_shard=5, layer_loads=lopsided) is not None
    with pytest.raises(ValueError, match="every layer's load"):
        rebalance(summed, current, slots_per_shard=5, layer_loads=[[1.0] * 3])
