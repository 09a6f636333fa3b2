"""The models' backend health, checked at most every `max_age_s` however often it is asked (a readiness probe
per second per pod must not become a Ray call per second per pod)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol


class _Checked(Protocol):
    async def healthy(self) -> bool: ...


class _Backends(Protocol):
    @property
    def backends(self) -> Mapping[str, _Checked]: ...


class BackendHealth:
    """Each model's `healthy()`, cached for `max_age_s`; a check that takes over `timeout_s` counts as unhealthy."""

    def __init__(self, gateway: _Backends, *, max_age_s: float = 5.0, timeout_s: float = 5.0) -> None:
        self.gateway = gateway
        self.max_age_s = max_age_s
        self.timeout_s = timeout_s
        self._states: dict[str, bool] = {}
        self._checked_at: float | None = None
        self._checking = asyncio.Lock()  # concurrent askers share one check

    async def states(self) -> dict[str, bool]:
        """Each model's health as of at most `max_age_s` ago (checked now when older)."""
        async with self._checking:
            if self._checked_at is None or time.monotonic() - self._checked_at >= self.max_age_s:
                await self.check()
            return dict(self._states)

    async def check(self) -> dict[str, bool]:
        """Ask every backend now (the operator's /health); the cache keeps the answer."""
        names = list(self.gateway.backends)
        answers = await asyncio.gather(*(self._one(n) for n in names))
        self._states = dict(zip(names, answers, strict=True))
        self._checked_at = time.monotonic()
        return dict(self._states)

    async def _one(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.gateway.backends[name].healthy(), self.timeout_s))
        except Exception:
            return False
