"""A model served by Ray Serve, reached through a deployment handle (the gateway runs in the Ray driver).

Serve routes each request to a replica, queues up to the deployment's max_queued_requests and refuses
beyond (BackPressureError: 429 here). Closing the stream cancels the request on the replica, which
aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError

from herd.model.tokenizer import Tokenizer
from herd.platform.gateway.errors import GatewayError, from_code, overloaded, unavailable
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.replica_core import ReplicaError
from herd.workers.serve_app import replica_states


class ServeBackend:
    READY_TTL_S = 1.0  # how long a count of ready replicas is reused (one controller call per model per second)

    def __init__(self, handle: Any, card: pb.ModelCard) -> None:
        self.handle = handle
        self.name = card.id
        self._card = card
        self.tokenizer = Tokenizer.from_pretrained(card.root)
        self._ready: tuple[float, int] | None = None  # (when, count)
        self._ready_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, app_name: str) -> ServeBackend:
        handle = serve.get_app_handle(app_name)
        return cls(handle, pb.ModelCard.FromString(await handle.model_card.remote()))

    def card(self) -> pb.ModelCard:
        return self._card

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateChunk]:
        stream = self.handle.options(stream=True).generate.remote(request.SerializeToString())
        finished = False
        try:
            async for data in stream:
                chunk = pb.GenerateChunk.FromString(data)
                finished = bool(chunk.finish_reason)
                yield chunk
        except BackPressureError:
            raise overloaded() from None
        except GatewayError:
            raise
        except ReplicaError as err:  # Ray re-raises the replica's exception as a subclass of it
            raise from_code(err.code, err.message) from err
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise unavailable(f"the replica of {self.name} is unavailable: {err}") from err
        finally:
            if not finished:
                stream.cancel()

    async def stats(self) -> dict[str, int]:
        return await self.handle.stats.remote()

    async def ready_replicas(self) -> int | None:
        async with self._ready_lock:
            if self._ready is None or time.monotonic() - self._ready[0] > self.READY_TTL_S:
                states = await asyncio.to_thread(replica_states, self.name)
                self._ready = (time.monotonic(), states.get("RUNNING", 0))
            return self._ready[1]

    async def healthy(self) -> bool:
        try:
            await self.handle.model_card.remote()
        except Exception:
            return False
        return True

