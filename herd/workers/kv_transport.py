"""How a prompt's KV export travels from a prefill replica to a decode replica (prefill/decode disaggregation).

The prefill replica `put`s the export and gets a handle small enough to pass through Serve (the proxy hands it,
inside a `Prefilled`, to the decode replica); the decode replica `take`s the export back with it. Ray's object
store carries it between replicas: the prefill replica owns the object, the proxy and the decode replica borrow its
reference, and Ray frees it once none holds it (a prefill replica that dies first takes its objects with it: the
decode replica's take fails and it computes the prompt itself). In-process, for tests, a dictionary does. A GPU to
GPU transport (NIXL, NCCL) would be one more implementation of the same two calls.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Literal, Protocol

import ray

from herd.engine.kv_export import KVExport


@dataclass(frozen=True)
class RayKVHandle:
    """An export in Ray's object store. Wrapped: Ray resolves an ObjectRef passed as a call's argument itself (the
    decode replica would receive the whole export through the proxy), but passes one inside an object as it is."""

    ref: ray.ObjectRef[KVExport]


@dataclass(frozen=True)
class Prefilled:
    """What a prefill replica answers: where its export is, and what the proxy counts and the decode side reports."""

    handle: object
    """The transport's handle of the export."""
    blocks: int
    """Prompt blocks exported (h: the global group's), and the export's bytes."""
    nbytes: int
    cached_tokens: int
    """Prompt tokens the prefill replica found in its own prefix cache: what the request's usage reports as cached,
    as a colocated replica's would (the decode side's import is a hit, but its blocks were computed for it)."""


class KVTransport(Protocol):
    async def put(self, export: KVExport) -> object:
        """Keep the export for one take; its handle."""
        ...

    async def take(self, handle: object) -> KVExport:
        """The export of a handle (LookupError: gone; TimeoutError: not there in time)."""
        ...


class RayKVTransport:
    """Exports as objects in Ray's store, owned by the replica that puts them."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s

    async def put(self, export: KVExport) -> RayKVHandle:
        return RayKVHandle(ray.put(export))

    async def take(self, handle: object) -> KVExport:
        if not isinstance(handle, RayKVHandle):
            raise TypeError(f"a Ray KV transport takes a RayKVHandle, got {type(handle).__name__}")
        try:
            export: KVExport = await asyncio.wait_for(asyncio.wrap_future(handle.ref.future()), self.timeout_s)
        except ray.exceptions.ObjectLostError as err:
            raise LookupError(f"the KV export is gone from Ray's object store: {err}") from err
        return export


class InProcessKVTransport:
    """Exports in a dictionary, each taken once (tests, and replicas sharing one process)."""

    def __init__(self) -> None:
        self._exports: dict[int, KVExport] = {}
        self._ids = itertools.count()

    async def put(self, export: KVExport) -> int:
        handle = next(self._ids)
        self._exports[handle] = export
        return handle

    async def take(self, handle: object) -> KVExport:
        if not isinstance(handle, int) or handle not in self._exports:
            raise LookupError(f"no KV export under handle {handle!r} (taken already, or never put here)")
        return self._exports.pop(handle)

    def __len__(self) -> int:
        """Exports put and not yet taken."""
        return len(self._exports)


def kv_transport(name: Literal["ray"], *, timeout_s: float = 30.0) -> KVTransport:
    """The transport a replica's settings name (Disaggregation.kv_transport)."""
    if name == "ray":
        return RayKVTransport(timeout_s=timeout_s)
    raise ValueError(f"unknown KV transport {name!r}")


__all__ = ["InProcessKVTransport", "KVTransport", "Prefilled", "RayKVHandle", "RayKVTransport", "kv_transport"]
