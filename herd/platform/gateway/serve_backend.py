"""A model served by Ray Serve, reached through a deployment handle (the gateway runs in the Ray driver).

Serve routes each request to a replica, queues up to the deployment's max_queued_requests and refuses
beyond (BackPressureError: 429 here). Closing the stream cancels the request on the replica, which
aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError

from herd.engine.errors import HerdError
from herd.model.image_prompts import ImagePrompts
from herd.model.tokenizer import Tokenizer
from herd.platform.gateway.cold_start import CachedCount
from herd.platform.gateway.errors import from_replica, overloaded, replica_unavailable
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.serve_app import replica_states


class ServeBackend:
    def __init__(self, handle: Any, card: pb.ModelCard) -> None:
        self.handle = handle
        self.name = card.id
        self._card = card
        self.tokenizer = Tokenizer.from_pretrained(card.root)
        self.image_prompts = ImagePrompts.from_pretrained(card.root)
        self._ready = CachedCount(self._running)  # one controller call per model per second

    @classmethod
    async def connect(cls, app_name: str) -> ServeBackend:
        handle = serve.get_app_handle(app_name)
        return cls(handle, pb.ModelCard.FromString(await handle.model_card.remote()))

    def card(self) -> pb.ModelCard:
        return self._card

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateChunk, None]:
        stream = self.handle.options(stream=True).generate.remote(request.SerializeToString())
        finished = False
        try:
            async for data in stream:
                chunk = pb.GenerateChunk.FromString(data)
                finished = bool(chunk.finish_reason)
                yield chunk
        except BackPressureError:
            raise overloaded() from None
        except HerdError as err:  # the replica's refusal (Ray re-raises it as a subclass of HerdError)
            raise from_replica(err, request_id=request.request_id) from err
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
            raise replica_unavailable(f"the replica of {self.name} is unavailable: {err}",
                                      request_id=request.request_id) from err
        except ray.exceptions.RayError as err:  # Ray itself failed between here and the replica: worth a retry
            raise replica_unavailable(f"the replica of {self.name} could not be reached: {type(err).__name__}: {err}",
                                      request_id=request.request_id) from err
        finally:
            if not finished:
                # Cancelling a request Serve refused re-raises the refusal (it fetches the result to cancel it):
                # that must not replace the 429 already raised above.
                with contextlib.suppress(Exception):
                    stream.cancel()

    async def stats(self) -> dict[str, int]:
        stats: dict[str, int] = await self.handle.stats.remote()  # ReplicaCore.stats, through Serve
        return stats

    async def ready_replicas(self) -> int | None:
        return await self._ready.get()

    async def _running(self) -> int:
        return (await asyncio.to_thread(replica_states, self.name)).get("RUNNING", 0)

    async def healthy(self) -> bool:
        try:
            await self.handle.model_card.remote()
        except Exception:
            return False
        return True

