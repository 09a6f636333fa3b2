"""The control loop with a fake load source and a fake actuator: it acts on changes, only as leader."""

from __future__ import annotations

import asyncio

from herd.platform.controlplane.actuators import ReplicaStatus
from herd.platform.controlplane.loop import ControlPlane
from herd.platform.controlplane.policy import Fleet, ModelMetrics, ModelPolicy


class FakeActuator:
    def __init__(self):
        self.target, self.calls = 1, []

    def status(self, model):
        return ReplicaStatus(target=self.target, ready=self.target, starting=0)

    def scale(self, model, replicas):
        self.calls.append((model, replicas))
        self.target = replicas


class FakeSource:
    def __init__(self):
        self.running = 0

    async def read(self):
        return {"scout": ModelMetrics(running=self.running)}


def test_acts_on_changes_logs_reasons_and_only_while_leading(caplog):
    source, actuator = FakeSource(), FakeActuator()
    now = [0.0]
    fleet = Fleet(policies={"scout": ModelPolicy(min_replicas=1, max_replicas=4, scale_down_window_s=30)})
    leading = [True]
    plane = ControlPlane(source, actuator, fleet, leader=lambda: leading[0], clock=lambda: now[0])
    caplog.set_level("INFO", logger="herd.controlplane")

    async def rounds(loads):
        for load in loads:
            source.running = load
            await plane.tick()
            now[0] += 10

    asyncio.run(rounds([0, 100, 100, 0, 0, 0, 0, 0]))
    assert actuator.calls == [("scout", 4), ("scout", 1)]
    assert any("scaling scout 1 -> 4" in r.getMessage() and "requests" in r.getMessage() for r in caplog.records)
    assert plane.decisions_total[("scout", "up")] == 1 and plane.decisions_total[("scout", "down")] == 1
    leading[0] = False
    asyncio.run(rounds([100, 100]))
    assert actuator.calls == [("scout", 4), ("scout", 1)], "a follower never acts"
