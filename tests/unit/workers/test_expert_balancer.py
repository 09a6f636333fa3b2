"""The replica's balancing policy: when it looks, what load it plans from, and what it does when a move fails."""

from __future__ import annotations

from herd.engine.errors import Code, HerdError
from herd.workers.dispatch import ExpertDispatcher
from herd.workers.expert_balancer import ExpertBalancer
from herd.workers.expert_load import ExpertLoad
from herd.workers.placement import Placement, place_experts
from herd.workers.replica_config import ExpertBalance
from herd.workers.transport import ShardWork, TransportStats


class MovingTransport:
    """Shards that take any placement (records the moves), or refuse every move with `fail`."""

    def __init__(self, placement: Placement, fail: HerdError | None = None) -> None:
        self.held = list(placement.shard_experts)
        self.moves: list[Placement] = []
        self.fail = fail
        self.stats = TransportStats()

    def shard_experts(self):
        return self.held

    def submit(self, layer: int, work: list[ShardWork]):
        return lambda: [w.rows for w in work]

    def run(self, layer, work):
        return self.submit(layer, work)()

    def replace(self, old: Placement, new: Placement) -> None:
        if self.fail is not None:
            raise self.fail
        assert list(old.shard_experts) == self.held
        self.held = list(new.shard_experts)
        self.moves.append(new)

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _route(load: ExpertLoad, placement: Placement, rows_per_expert: list[int], layers=(1, 3)) -> None:
    counts = [rows_per_expert[e] for e in placement.expert_order]
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    for layer in layers:
        load.add(layer, placement.expert_order, bounds)


def _balancer(config: ExpertBalance, fail: HerdError | None = None):
    placement = place_experts(16, 4)
    transport = MovingTransport(placement, fail)
    dispatcher = ExpertDispatcher(placement, transport)
    replaced: list[float] = []
    return ExpertBalancer(dispatcher, config, (1, 3), on_replace=replaced.append), dispatcher, transport, replaced


def test_it_looks_every_interval_and_moves_when_the_window_is_skewed():
    balancer, dispatcher, transport, replaced = _balancer(ExpertBalance(enabled=True, interval_steps=5, min_tokens=100))
    skewed = [1] * 16
    skewed[0] = skewed[1] = 300  # both on shard 0
    for _ in range(4):
        _route(dispatcher.load, dispatcher.placement, skewed)
        assert balancer.between_steps() is None, "not a look yet"
    moved = balancer.between_steps()
    assert moved is not None and transport.moves == [moved] and dispatcher.placement == moved
    assert len(replaced) == 1 and balancer.replacements == 1
    assert max(len(held) for held in moved.shard_experts) <= balancer.slots_per_shard == 4 + 1
    assert {0, 1} - set(moved.shard_experts[0]) or len(moved.replicas[0]) > 1, "the hot pair no longer on one shard"


def test_the_window_is_the_load_since_the_last_look_and_small_windows_are_skipped():
    balancer, dispatcher, transport, _ = _balancer(ExpertBalance(enabled=True, interval_steps=1, min_tokens=1000))
    skewed = [1] * 16
    skewed[0] = 5000
    _route(dispatcher.load, dispatcher.placement, skewed)  # before the balancer's first look at the totals
    balancer._seen = balancer._totals()  # as if it had been there: this load is history, not the window
    assert balancer.between_steps() is None and transport.moves == [], "an empty window plans nothing"
    _route(dispatcher.load, dispatcher.placement, [10] * 16)  # 320 tokens: below min_tokens
    assert balancer.between_steps() is None and transport.moves == []
    _route(dispatcher.load, dispatcher.placement, [40] * 16)  # even load: nothing worth moving
    assert balancer.between_steps() is None and transport.moves == []


def test_a_failed_move_stops_balancing_for_good():
    failure = HerdError(Code.UNAVAILABLE, "an expert shard of this replica is unavailable")
    config = ExpertBalance(enabled=True, interval_steps=1, min_tokens=1)
    balancer, dispatcher, _, replaced = _balancer(config, fail=failure)
    skewed = [1] * 16
    skewed[0] = skewed[1] = 300
    start = dispatcher.placement
    _route(dispatcher.load, dispatcher.placement, skewed)
    assert balancer.between_steps() is None
    assert balancer.stopped and "unavailable" in balancer.stopped and dispatcher.placement == start
    _route(dispatcher.load, dispatcher.placement, skewed)
    assert balancer.between_steps() is None and replaced == []


def test_a_move_helps_every_layer_not_only_their_sum():
    """Two layers with different hot experts (on shards 0 and 3): the balancer judges a plan layer by layer, so
    whatever it moves to leaves neither layer's slowest shard worse off than today's."""
    balancer, dispatcher, _, _ = _balancer(ExpertBalance(enabled=True, interval_steps=1, min_tokens=1))
    first, second = [10] * 16, [10] * 16
    first[0] = first[1] = 400  # shard 0's experts hot in layer 1
    second[12] = second[13] = 400  # shard 3's in layer 3
    _route(dispatcher.load, dispatcher.placement, first, layers=(1,))
    _route(dispatcher.load, dispatcher.placement, second, layers=(3,))
    moved = balancer.between_steps()
    if moved is not None:  # a plan that helps both layers is fine; one that helps the sum only is not
        from herd.workers.balance import shard_rows

        for load in (first, second):
            assert max(shard_rows(moved, load)) < max(shard_rows(place_experts(16, 4), load))
