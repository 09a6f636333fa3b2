"""Which trunk takes a request: least KV held, a prefix-cache hit while not much busier than the least loaded."""

from __future__ import annotations

import pytest

from herd.engine.trunk_choice import TrunkLoad, choose_trunk


def test_the_trunk_holding_the_least_kv_wins_then_the_fewest_requests_then_the_first():
    assert choose_trunk([TrunkLoad(30, 2), TrunkLoad(10, 5), TrunkLoad(20, 1)]) == 1
    assert choose_trunk([TrunkLoad(10, 3), TrunkLoad(10, 2)]) == 1
    assert choose_trunk([TrunkLoad(0, 0), TrunkLoad(0, 0)]) == 0


def test_a_prefix_hit_wins_unless_its_trunk_is_too_busy():
    loads = [TrunkLoad(5, 1), TrunkLoad(50, 4, prefix_blocks=3)]
    assert choose_trunk(loads) == 1
    assert choose_trunk(loads, imbalance=2) == 0  # 4 requests against 1: past the imbalance
    assert choose_trunk([TrunkLoad(5, 1, prefix_blocks=2), TrunkLoad(50, 4, prefix_blocks=3)]) == 1  # the longer hit
    assert choose_trunk([TrunkLoad(5, 1, prefix_blocks=3), TrunkLoad(1, 1, prefix_blocks=3)]) == 1  # then less KV


def test_no_trunk_is_refused():
    with pytest.raises(ValueError, match="at least one trunk"):
        choose_trunk([])
