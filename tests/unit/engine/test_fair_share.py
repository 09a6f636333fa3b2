"""FairShare on its own: virtual time is tokens over weight, a returning tenant starts level with the
least-served busy one, and serving the smallest virtual time first splits tokens by weight.
(test_scheduler.py checks the same rules through the scheduler's queues.)"""

from __future__ import annotations

import pytest

from herd.engine.fair_share import FairShare


def serve(fair: FairShare, busy: dict[str, float], rounds: int, tokens: int = 10) -> list[str]:
    """Who goes next, `rounds` times over: least virtual time first, ties by name; each charged `tokens`."""
    order = []
    for _ in range(rounds):
        tenant = min(busy, key=lambda t: (fair.virtual_time(t), t))
        fair.charge(tenant, tokens, busy[tenant])
        order.append(tenant)
    return order


def test_virtual_time_is_tokens_over_weight_summed():
    fair = FairShare()
    assert fair.virtual_time("a") == 0.0, "a tenant never seen has been served nothing"
    fair.charge("a", 100, 2.0)
    fair.charge("a", 30, 1.5)
    fair.charge("b", 7, 1.0)
    assert fair.virtual_time("a") == pytest.approx(100 / 2.0 + 30 / 1.5)
    assert fair.virtual_time("b") == pytest.approx(7.0)


def test_a_returning_tenant_starts_level_with_the_least_served_busy_tenant():
    fair = FairShare()
    fair.charge("a", 100, 1.0)
    fair.charge("b", 300, 1.0)
    fair.charge("idle", 10, 1.0)
    fair.charge("gone", 5, 1.0)  # not busy: its time is no floor
    fair.activate("idle", busy={"a", "b"})
    assert fair.virtual_time("idle") == 100.0, "min over the busy tenants, not over everyone"
    fair.activate("new", busy={"a", "b", "new"})
    assert fair.virtual_time("new") == 100.0, "its own entry in the busy set is no floor"


def test_a_tenant_ahead_of_the_busy_ones_keeps_its_time():
    fair = FairShare()
    fair.charge("a", 500, 1.0)
    fair.charge("b", 100, 1.0)
    fair.activate("a", busy={"b"})
    assert fair.virtual_time("a") == 500.0, "activation never moves a tenant back"


@pytest.mark.parametrize("busy", [set(), {"a"}])
def test_with_no_other_busy_tenant_activation_keeps_the_tenants_own_time(busy):
    fair = FairShare()
    fair.charge("a", 40, 2.0)
    fair.activate("a", busy=busy)
    fair.activate("b", busy=busy - {"a"})
    assert fair.virtual_time("a") == 20.0
    assert fair.virtual_time("b") == 0.0


def test_least_virtual_time_first_splits_tokens_by_weight():
    fair = FairShare()
    weights = {"heavy": 3.0, "light": 1.0}
    for tenant in weights:
        fair.activate(tenant, busy=set(weights))
    order = serve(fair, weights, rounds=400)
    assert order.count("heavy") == 3 * order.count("light") == 300
    assert "light" in order[:4], "the light tenant is served within one cycle, not after the heavy one's queue"


def test_idling_banks_no_credit_to_burst_with_later():
    fair = FairShare()
    both = {"a": 1.0, "b": 1.0}
    serve(fair, {"a": 1.0}, rounds=100)  # b idle meanwhile: a is charged 1000 tokens
    fair.activate("b", busy={"a"})
    order = serve(fair, both, rounds=10)
    # Without the floor b would take the next 100 turns in a row.
    assert order.count("a") == order.count("b") == 5, order
