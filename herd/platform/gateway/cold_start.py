"""Requests for a model with no ready replica: scaled to zero, or its first replica still loading.

The gateway holds such a request for up to the model's `cold_start_wait_s` (within the request's own
deadline). While held it counts as in flight and as waiting for a replica, so the control plane sees the
demand and starts one. If none is ready in time the answer is 503 UNAVAILABLE with Retry-After, and the
refusal still counts as demand for a minute, so the replica keeps coming for the client's retry.
A backend that cannot tell how many replicas are ready (None) is never held here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from herd.platform.gateway.errors import cold_start
from herd.platform.gateway.load import LoadTracker


@dataclass(frozen=True, kw_only=True)
class ColdStartPolicy:
    """How one model's requests wait for a replica."""

    wait_s: float = 30.0  # hold a request this long for a replica (0: answer 503 at once)
    retry_after_s: int = 30  # the 503's Retry-After: about how long a replica takes to load
    poll_s: float = 0.5  # how often a held request looks again


class CachedCount:
    """A backend's count of ready replicas, asked of its source at most once per `ttl_s` however many
    requests want it (concurrent askers wait for the one call under way)."""

    def __init__(self, fetch: Callable[[], Awaitable[int | None]], *, ttl_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch, self.ttl_s, self.clock = fetch, ttl_s, clock
        self._value: tuple[float, int | None] | None = None  # (when, count)
        self._lock = asyncio.Lock()

    async def get(self) -> int | None:
        async with self._lock:
            if self._value is None or self.clock() - self._value[0] > self.ttl_s:
                self._value = (self.clock(), await self.fetch())
            return self._value[1]


class ReplicaCount(Protocol):
    name: str

    async def ready_replicas(self) -> int | None: ...


async def wait_for_replica(backend: ReplicaCount, load: LoadTracker, policy: ColdStartPolicy, *,
                           deadline: float, clock: Callable[[], float] = time.monotonic) -> None:
    """Return once `backend` has a ready replica (or cannot tell); raise the 503 when the wait runs out."""
    ready = await backend.ready_replicas()
    if ready is None or ready > 0:
        return
    started = clock()
    until = min(started + policy.wait_s, deadline)
    load.waiting(backend.name, +1)
    try:
        while clock() < until:
            await asyncio.sleep(max(0.0, min(policy.poll_s, until - clock())))
            ready = await backend.ready_replicas()
            if ready is None or ready > 0:
                return
        load.refused_for_cold_start(backend.name)
        raise cold_start(backend.name, clock() - started, policy.retry_after_s)
    finally:
        load.waiting(backend.name, -1)
