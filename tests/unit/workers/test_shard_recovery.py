"""The restart budget of a replica's shards: at most `limit` restarts in a sliding window."""

from __future__ import annotations

from herd.workers.shard_recovery import RestartBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restarts_past_the_limit_within_the_window_are_refused_and_allowed_again_as_old_ones_age_out():
    clock = Clock()
    budget = RestartBudget(3, window_s=60, clock=clock)
    assert [budget.allow() for _ in range(3)] == [True] * 3
    assert not budget.allow(), "a fourth restart within a minute: crash-looping"
    clock.now += 59.9
    assert not budget.allow(), "a refused one is not counted, the first three are still in the window"
    clock.now += 0.1
    assert budget.allow(), "the first three aged out"
    assert budget.allow() and budget.allow() and not budget.allow()


def test_a_budget_of_zero_allows_no_restart():
    assert not RestartBudget(0).allow()
