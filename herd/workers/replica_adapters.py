"""The LoRA adapters a replica's engine has registered, loaded on first use from the path the gateway sends.

A request names its adapter by its registration's engine name (<adapter>@<id>, herd.platform.tenancy) and path.
The first request for it registers it (read and checked on a worker thread, added between steps: one load
however many requests ask at once); later ones find it registered. A request holds a lease on its adapter until
its stream ends, and only an adapter without leases is dropped: past `max_registered`, the least recently used
one goes (its host memory with it; asked for again, it is read again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator

from herd.engine import AsyncLLMEngine
from herd.engine.errors import Code, HerdError


class ReplicaAdapters:
    def __init__(self, engine: AsyncLLMEngine, *, max_registered: int) -> None:
        if max_registered < 1:
            raise ValueError(f"max_registered must be >= 1, got {max_registered}")
        self.engine = engine
        self.max_registered = max_registered
        self._registered: OrderedDict[str, str] = OrderedDict()  # name -> path, least recently used first
        self._leases: Counter[str] = Counter()
        self._loading: dict[str, asyncio.Future[None]] = {}

    @contextlib.asynccontextmanager
    async def lease(self, name: str, path: str) -> AsyncIterator[str]:
        """Adapter `name` registered (from `path`) and kept while the block runs; yields the name to run with.
        HerdError: INVALID_ARGUMENT without a name or path, UNAVAILABLE when it cannot be read here."""
        if not name or not path:
            raise HerdError(Code.INVALID_ARGUMENT, "a LoRA adapter needs a name and a path")
        self._leases[name] += 1
        try:
            await self._ensure(name, path)
            self._registered.move_to_end(name)
            yield name
        finally:
            self._leases[name] -= 1
            if not self._leases[name]:
                del self._leases[name]

    def registered(self) -> list[str]:
        """The registered adapters' names, least recently used first."""
        return list(self._registered)

    async def _ensure(self, name: str, path: str) -> None:
        if name in self._registered:
            return
        pending = self._loading.get(name)
        if pending is not None:
            await asyncio.shield(pending)
            return
        pending = asyncio.get_running_loop().create_future()
        self._loading[name] = pending
        try:
            await self.engine.add_adapter(name, path)
        except BaseException as err:  # AdapterError too: registration checked it, so the files changed since
            failure = _unloadable(name, err)
            pending.set_exception(failure)
            pending.exception()  # retrieved: waiters, if any, raise it themselves
            if isinstance(err, ValueError):
                raise failure from err
            raise
        finally:
            del self._loading[name]
        self._registered[name] = path
        pending.set_result(None)
        await self._trim()

    async def _trim(self) -> None:
        """Drop least recently used adapters without leases while more than max_registered are registered."""
        while len(self._registered) > self.max_registered:
            victim = next((n for n in self._registered if not self._leases[n]), None)
            if victim is None:
                return
            path = self._registered.pop(victim)
            try:
                await self.engine.remove_adapter(victim)
            except ValueError:  # an aborted request has not left the engine yet: keep it, try at the next load
                self._registered[victim] = path
                self._registered.move_to_end(victim, last=False)
                return


def _unloadable(name: str, err: BaseException) -> HerdError:
    """What a request for an adapter that could not be registered gets (the path is not named: tenants read it)."""
    adapter = name.rpartition("@")[0] or name
    return HerdError(Code.UNAVAILABLE, f"LoRA adapter {adapter!r} could not be loaded on this replica; its files "
                     f"may have changed since it was registered ({type(err).__name__})")


__all__ = ["ReplicaAdapters"]
