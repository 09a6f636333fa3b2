"""The control loop: read load, ask the policy, bring each unit's replicas to its target (a colocated model's, or
each pool's of a disaggregated model: herd.platform.controlplane.units), log every decision with its reason and
export it as a metric.

Acting is level-triggered, like a Kubernetes controller: every round compares the policy's target with
what the actuator holds, and a unit whose change is still being applied (Serve bringing up a replica
can take minutes) is left to finish; the round after it ends applies whatever the target is by then.
So a slow actuation never stalls the rounds of the other units, and a failed one is simply retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from herd.platform.controlplane.actuators import Actuator, ReplicaStatus
from herd.platform.controlplane.metrics import MetricsSource
from herd.platform.controlplane.policy import Decision, Fleet, ModelMetrics, ModelState, decide
from herd.platform.controlplane.units import Unit, colocated, unit_metrics

log = logging.getLogger("herd.controlplane")


class PlaneMetrics:
    """What the control plane exports (Prometheus names), in its own registry. `model` is the unit's name: the
    model, or a pool's deployment (<model>-prefill, <model>-decode)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter("herd_controlplane_decisions", "Policy decisions by direction (up, down, hold)",
                                 ["model", "direction"], registry=registry)
        self.target = Gauge("herd_controlplane_target_replicas", "Replicas the policy wants", ["model"],
                            registry=registry)
        self.ready = Gauge("herd_controlplane_ready_replicas", "Replicas serving", ["model"], registry=registry)
        self.starting = Gauge("herd_controlplane_starting_replicas", "Replicas loading", ["model"], registry=registry)
        self.leader = Gauge("herd_controlplane_leader", "1 while this instance leads", registry=registry)
        self.failures = Counter("herd_controlplane_failures", "Failed rounds and actuations", ["stage"],
                                registry=registry)


class ControlPlane:
    def __init__(self, source: MetricsSource, actuator: Actuator, fleet: Fleet, *, interval_s: float = 10.0,
                 units: Mapping[str, Unit] | None = None, leader: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, registry: CollectorRegistry | None = None) -> None:
        """`fleet` has a policy per unit name; `units` says what each name scales (default: every name a
        colocated model)."""
        self.source, self.actuator, self.fleet = source, actuator, fleet
        self.units = dict(units) if units is not None else {name: colocated(name) for name in fleet.policies}
        if set(self.units) != set(fleet.policies):
            raise ValueError(f"units {sorted(self.units)} and policies {sorted(fleet.policies)} differ")
        self.interval_s = interval_s
        self.leader = leader or (lambda: True)
        self.clock = clock
        self.state: dict[str, ModelState] = {}
        self.last: dict[str, Decision] = {}
        self.metrics = PlaneMetrics(registry or CollectorRegistry())
        self._acting: dict[str, asyncio.Task[None]] = {}

    async def tick(self) -> dict[str, Decision]:
        """One round; acts only while this instance leads."""
        leading = await asyncio.to_thread(self.leader)
        self.metrics.leader.set(1 if leading else 0)
        if not leading:
            return {}
        load = await self.source.read()
        metrics: dict[str, ModelMetrics] = {}
        held: dict[str, ReplicaStatus] = {}
        for name, unit in self.units.items():
            held[name] = status = await asyncio.to_thread(self.actuator.status, unit.model, unit.deployment)
            share = unit_metrics(unit, load.get(unit.model, ModelMetrics()))
            metrics[name] = replace(share, ready=status.ready, starting=status.starting)
            if name not in self.state:
                self.state[name] = ModelState(target=status.target, last_busy=self.clock())
        decisions, self.state = decide(metrics, self.state, self.clock(), self.fleet)
        for name, decision in decisions.items():
            self._export(name, decision, held[name])
            if decision.changed:
                log.info("scaling %s %d -> %d: %s", name, decision.previous, decision.target, decision.reason)
            else:
                log.debug("holding %s at %d: %s", name, decision.target, decision.reason)
            if decision.target != held[name].target and not self.acting(name):
                self._acting[name] = asyncio.create_task(self._scale(self.units[name], decision.target))
        self.last = decisions
        return decisions

    @property
    def registry(self) -> CollectorRegistry:
        """The control plane's Prometheus metrics (a gateway running it serves them on its /metrics)."""
        return self.metrics.registry

    async def report(self) -> dict[str, Any]:
        """Each unit's replicas as the actuator holds them (and whether a change is under way), and the last
        decision per unit with its reason: what /herd/controlplane shows. A pool's entries also name its model
        and pool."""
        replicas = {}
        for name, unit in self.units.items():
            status = await asyncio.to_thread(self.actuator.status, unit.model, unit.deployment)
            replicas[name] = {**asdict(status), "acting": self.acting(name), **self._pool_of(unit)}
        decisions = {name: {"target": d.target, "previous": d.previous, "reason": d.reason,
                            **self._pool_of(self.units[name])} for name, d in self.last.items()}
        return {"enabled": True, "replicas": replicas, "decisions": decisions}

    @staticmethod
    def _pool_of(unit: Unit) -> dict[str, str]:
        return {} if unit.pool is None else {"model": unit.model, "pool": unit.pool}

    def acting(self, name: str) -> bool:
        """Whether a change of unit `name`'s replicas is still being applied."""
        task = self._acting.get(name)
        return task is not None and not task.done()

    async def settle(self) -> None:
        """Wait for every change under way (tests, shutdown)."""
        await asyncio.gather(*(t for t in self._acting.values() if not t.done()), return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:  # a failed round is logged and retried; the loop must not die
                self.metrics.failures.labels("round").inc()
                log.exception("control-plane round failed")
            with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a cancel
                async with asyncio.timeout(self.interval_s):
                    await stop.wait()
        await self.settle()

    async def _scale(self, unit: Unit, replicas: int) -> None:
        try:
            await asyncio.to_thread(self.actuator.scale, unit.model, replicas, unit.deployment)
        except Exception:  # the next round sees the target still differs and tries again
            self.metrics.failures.labels("scale").inc()
            log.exception("scaling %s to %d failed", unit.name, replicas)

    def _export(self, name: str, decision: Decision, status: ReplicaStatus) -> None:
        direction = "hold" if not decision.changed else ("up" if decision.target > decision.previous else "down")
        self.metrics.decisions.labels(name, direction).inc()
        self.metrics.target.labels(name).set(decision.target)
        self.metrics.ready.labels(name).set(status.ready)
        self.metrics.starting.labels(name).set(status.starting)
