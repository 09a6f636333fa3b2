"""Where the gateway sends a model's requests: one interface, a replica in this process or Ray Serve.

A backend takes internal herd.v1 GenerateRequests (token ids, checked) and streams GenerateChunks;
failures arrive as HerdError. Closing the stream early (client gone, deadline) aborts the request
in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Protocol

from herd.engine.errors import HerdError
from herd.model.image_prompts import ImagePrompts
from herd.model.tokenizer import Tokenizer
from herd.platform.gateway.errors import from_replica, overloaded
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_core import ReplicaCore


class Backend(Protocol):
    name: str
    tokenizer: Tokenizer
    image_prompts: ImagePrompts | None
    """How the model takes images (None: text only)."""

    def card(self) -> pb.ModelCard: ...

    def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateChunk, None]:
        """The request's chunks; closing the stream early (aclose) aborts the request."""
        ...

    async def stats(self) -> dict[str, int]: ...

    async def healthy(self) -> bool: ...

    async def ready_replicas(self) -> int | None:
        """Replicas serving now (0: scaled to zero or still loading; None: cannot tell)."""
        ...


class LocalBackend:
    """A ReplicaCore in this process, behind a bounded admission count (in flight + queued)."""

    def __init__(self, core: ReplicaCore, *, max_ongoing_requests: int = 64, max_queued_requests: int = 64) -> None:
        self.core = core
        self.name = core.config.name
        self.tokenizer = core.tokenizer
        self.image_prompts = core.image_prompts
        self.capacity = max_ongoing_requests + max_queued_requests
        self._active = 0

    def card(self) -> pb.ModelCard:
        return self.core.model_card()

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateChunk, None]:
        if self._active >= self.capacity:
            raise overloaded()
        self._active += 1
        try:
            async with contextlib.aclosing(self.core.generate(request)) as stream:
                async for chunk in stream:
                    yield chunk
        except HerdError as err:
            raise from_replica(err, request_id=request.request_id) from err
        finally:
            self._active -= 1

    async def stats(self) -> dict[str, int]:
        return self.core.stats()

    async def healthy(self) -> bool:
        return self.core.healthy()

    async def ready_replicas(self) -> int | None:
        return 1  # the core in this process


__all__ = ["Backend", "LocalBackend"]
