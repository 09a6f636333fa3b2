"""Where prompts' prefixes went: a bounded table that prefix-aware routing learns from and asks.

Invariant: a key names a whole prompt prefix under one cache salt. Key i chains key i-1, so two requests
share key i only when they agree on the salt and on every token (or character) up to the end of chunk i;
the table maps a key to the replicas a request holding that prefix was sent to. A replica that served a
prefix is the one most likely to hold its KV blocks (the engine's prefix cache keeps a finished request's
full blocks until it needs the room), so the next turn of a chat, which resends the whole history, goes
back there.

The salt is the engine's own (herd.engine.llm_engine prepare: ``group:<sharing_group>`` if set, else
``tenant:<tenant_id>``), so the same prompt from another tenant has other keys and never follows the first
tenant's requests, while a sharing group's tenants share. Chunks are the engine's blocks (chunk_tokens, the
engine's block_size by default): the engine caches only full blocks, so a shorter tail cannot hit there.
The keys are the router's own (BLAKE2b, 16 bytes), not the engine's: a collision only misroutes a request,
it never changes what the engine computes (the engine keys its cache with SHA-256). A request's images are
ignored: a prompt that differs only in its pixels goes where the same tokens went, which holds the blocks
before the first image at least.

`rank` is the pure decision: the replica holding the longest prefix first, unless it is overloaded; else
the least loaded.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import OrderedDict
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from herd.engine.prefix_hash import cache_salt as engine_cache_salt
from herd.protos.herd.v1 import inference_pb2 as pb

R = TypeVar("R", bound=Hashable)
"""A replica's id (Serve's ReplicaID in the router, strings in tests)."""

CHUNK_TOKENS = 16
"""Tokens per chunk: EngineConfig.block_size's default."""
CHUNK_CHARS = 64
"""Characters per chunk of a text prompt (about as many tokens as CHUNK_TOKENS)."""
MAX_ENTRIES = 200_000
"""Prefix keys remembered (a few hundred bytes each): 3.2 million tokens of distinct prefixes at 16 a chunk."""

_DIGEST_BYTES = 16


def cache_salt(tenant: pb.TenantContext) -> str:
    """The engine's cache salt of a request from this tenant (as herd.workers.replica_core hands the tenant to
    the engine: an empty tenant_id is "default")."""
    return engine_cache_salt(tenant.tenant_id or "default", tenant.sharing_group or None)


@dataclass
class RouteCounts:
    """Requests routed for one cache salt."""

    hits: int = 0
    """Sent to a replica that had served a prefix of the prompt."""
    misses: int = 0
    """Sent to a replica that had served none of it (or the prompt is shorter than a chunk)."""
    matched_chunks: int = 0
    """Chunks of the prompts' prefixes the chosen replicas had served, summed."""


@dataclass(frozen=True)
class ReplicaLoad(Generic[R]):
    """A candidate replica as the router sees it now."""

    replica_id: R
    queue_len: int | None
    """Requests in flight on it, as last reported (None: unknown, its probe failed)."""
    max_ongoing: int
    """Requests it takes at once; at this many its queue is full."""

    @property
    def available(self) -> bool:
        return self.queue_len is not None and self.queue_len < self.max_ongoing


class PrefixAffinity(Generic[R]):
    """Prefix keys to the replicas they were sent to, least recently used dropped beyond max_entries."""

    def __init__(self, *, chunk_tokens: int = CHUNK_TOKENS, chunk_chars: int = CHUNK_CHARS,
                 max_entries: int = MAX_ENTRIES) -> None:
        for name, value in (("chunk_tokens", chunk_tokens), ("chunk_chars", chunk_chars),
                            ("max_entries", max_entries)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.chunk_tokens, self.chunk_chars, self.max_entries = chunk_tokens, chunk_chars, max_entries
        self._holders: OrderedDict[bytes, tuple[R, ...]] = OrderedDict()  # most recently sent to last
        self.counts: dict[str, RouteCounts] = {}
        """Routed requests by cache salt."""

    def __len__(self) -> int:
        return len(self._holders)

    def keys(self, request: pb.GenerateRequest) -> list[bytes]:
        """The keys of the request's full chunks, in prompt order (none for a prompt shorter than a chunk)."""
        salt = cache_salt(request.tenant)
        if request.WhichOneof("prompt") == "text":
            text = request.text
            width = self.chunk_chars
            chunks = [text[i:i + width].encode() for i in range(0, len(text) - width + 1, width)]
            return _chain(b"text\0" + salt.encode(), chunks)
        ids = request.token_ids.ids
        packed = array("q", ids).tobytes()  # 8 bytes a token
        width = self.chunk_tokens * 8
        return _chain(b"tokens\0" + salt.encode(), [packed[i:i + width] for i in range(0, len(packed) - width + 1,
                                                                                      width)])

    def match(self, keys: Sequence[bytes], replica_ids: Collection[R]) -> tuple[R | None, int]:
        """(the live replica that was sent the longest prefix of these keys, its length in chunks); (None, 0)
        when none of replica_ids was. Among several, the one sent it last."""
        live = set(replica_ids)
        for i in range(len(keys) - 1, -1, -1):
            for replica in reversed(self._holders.get(keys[i], ())):
                if replica in live:
                    return replica, i + 1
        return None, 0

    def record(self, keys: Sequence[bytes], replica_id: R) -> None:
        """The request of these keys was sent to replica_id. Touched deepest first, so the shortest prefixes
        (shared by the most requests) are the last to be dropped."""
        for key in reversed(keys):
            holders = tuple(r for r in self._holders.pop(key, ()) if r != replica_id)
            self._holders[key] = (*holders, replica_id)
        while len(self._holders) > self.max_entries:
            self._holders.popitem(last=False)

    def forget(self, replica_id: R) -> None:
        """The replica is gone: nothing it served is held anywhere on its account."""
        for key in list(self._holders):
            holders = self._holders[key]
            if replica_id in holders:
                if len(holders) == 1:
                    del self._holders[key]
                else:
                    self._holders[key] = tuple(r for r in holders if r != replica_id)

    def count(self, salt: str, matched_chunks: int) -> None:
        """A request of this salt was routed to a replica that had been sent matched_chunks of its prefix."""
        counts = self.counts.setdefault(salt, RouteCounts())
        if matched_chunks:
            counts.hits += 1
            counts.matched_chunks += matched_chunks
        else:
            counts.misses += 1


def _chain(root: bytes, chunks: Sequence[bytes]) -> list[bytes]:
    previous = hashlib.blake2b(b"herd-route\0" + root, digest_size=_DIGEST_BYTES).digest()
    keys = []
    for chunk in chunks:
        previous = hashlib.blake2b(previous + chunk, digest_size=_DIGEST_BYTES).digest()
        keys.append(previous)
    return keys


def least_loaded(loads: Sequence[ReplicaLoad[R]], rng: random.Random) -> list[R]:
    """Replicas by queue length, shortest first: available ones, then full ones, then unknown ones; ties in a
    random order (so idle replicas share new conversations)."""
    def order(load: ReplicaLoad[R]) -> tuple[int, int, float]:
        if load.queue_len is None:
            return 2, 0, rng.random()
        return (0 if load.available else 1), load.queue_len, rng.random()

    return [load.replica_id for load in sorted(loads, key=order)]


def rank(loads: Sequence[ReplicaLoad[R]], matched: R | None, imbalance_requests: int,
         rng: random.Random) -> list[R]:
    """Replicas in the order to try them. The matched replica (it holds the request's longest prefix) first,
    unless its queue is full or unknown, or longer than the shortest available queue by more than
    imbalance_requests; the rest (or all, then) least loaded first."""
    by_id = {load.replica_id: load for load in loads}
    best = by_id.get(matched) if matched is not None else None
    shortest = min((load.queue_len for load in loads if load.available and load.queue_len is not None),
                   default=None)
    if best is None or not best.available or best.queue_len is None or shortest is None \
            or best.queue_len - shortest > imbalance_requests:
        return least_loaded(loads, rng)
    return [best.replica_id, *least_loaded([load for load in loads if load is not best], rng)]


__all__ = ["CHUNK_CHARS", "CHUNK_TOKENS", "MAX_ENTRIES", "PrefixAffinity", "ReplicaLoad", "RouteCounts",
           "cache_salt", "least_loaded", "rank"]
