"""The control loop: read load, ask the policy, act on what changed, log every decision with its reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from herd.platform.controlplane.actuators import Actuator
from herd.platform.controlplane.metrics import MetricsSource
from herd.platform.controlplane.policy import Decision, Fleet, ModelMetrics, ModelState, decide

log = logging.getLogger("herd.controlplane")


class ControlPlane:
    def __init__(self, source: MetricsSource, actuator: Actuator, fleet: Fleet, *, interval_s: float = 10.0,
                 leader: Callable[[], bool] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.source, self.actuator, self.fleet = source, actuator, fleet
        self.interval_s = interval_s
        self.leader = leader or (lambda: True)
        self.clock = clock
        self.state: dict[str, ModelState] = {}
        self.decisions_total: Counter[tuple[str, str]] = Counter()  # (model, up|down|hold)
        self.last: dict[str, Decision] = {}

    async def tick(self) -> dict[str, Decision]:
        """One round; acts only while this instance leads."""
        if not await asyncio.to_thread(self.leader):
            return {}
        load = await self.source.read()
        metrics = {}
        for model in self.fleet.policies:
            status = await asyncio.to_thread(self.actuator.status, model)
            seen = load.get(model, ModelMetrics())
            metrics[model] = replace(seen, ready=status.ready, starting=status.starting)
            if model not in self.state:
                self.state[model] = ModelState(target=status.target, last_busy=self.clock())
        decisions, self.state = decide(metrics, self.state, self.clock(), self.fleet)
        for model, decision in decisions.items():
            direction = "hold" if not decision.changed else ("up" if decision.target > decision.previous else "down")
            self.decisions_total[(model, direction)] += 1
            if decision.changed:
                log.info("scaling %s %d -> %d: %s", model, decision.previous, decision.target, decision.reason)
                await asyncio.to_thread(self.actuator.scale, model, decision.target)
        self.last = decisions
        return decisions

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # a failed round is logged and retried; the loop must not die
                log.exception("control-plane round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
