"""Waiting for a condition instead of sleeping for a guessed time: each helper returns True the moment
the condition holds, and False once `timeout_s` has passed without it, so a test can
`assert wait_until(...), "what never happened"`. The timeout bounds a failure, never a success."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float = 10.0, *, interval_s: float = 0.01) -> bool:
    """Poll `condition` from this thread until it is true (True) or `timeout_s` has passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


async def until(condition: Callable[[], object], timeout_s: float = 10.0, *, interval_s: float = 0.01) -> bool:
    """wait_until for a coroutine: poll without blocking the event loop the condition depends on."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval_s)
    return True
