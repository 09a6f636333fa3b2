"""A model reached through Ray Serve's gRPC proxy (`herd gateway` outside the Ray cluster, as the Helm
chart runs it): the replica's `Generate` is called with `application` metadata naming the model. Its ready
replicas come from the cluster's Ray dashboard (`GET /api/serve/applications/`) when its URL is given."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import httpx

from herd.engine.config import EngineConfig
from herd.model.config import load_config
from herd.model.image_prompts import ImagePrompts
from herd.model.tokenizer import Tokenizer
from herd.platform.gateway.cold_start import CachedCount
from herd.platform.gateway.errors import from_status, replica_unavailable
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.serve_details import replica_counts


class ServeGrpcBackend:
    HEALTH_TIMEOUT_S = 2.0  # /health answers 503 rather than hang while Serve's proxy is out of reach

    def __init__(self, name: str, path: str | Path, target: str, *, engine: EngineConfig | None = None,
                 status_url: str | None = None) -> None:
        """`engine`: the replicas' engine settings, for the context limit they allow."""
        self.name = name
        self.status_url = status_url.rstrip("/") if status_url else None
        self._ready = CachedCount(self._fetch_ready)
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.image_prompts = ImagePrompts.from_pretrained(path)
        limit = (engine or EngineConfig()).context_limit(load_config(path).text)
        self._card = pb.ModelCard(id=name, root=str(path), max_model_len=limit, created=int(time.time()))
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def card(self) -> pb.ModelCard:
        return self._card

    async def generate(self, request: pb.GenerateRequest) -> AsyncGenerator[pb.GenerateChunk, None]:
        call = self.stub.Generate(request, metadata=(("application", self.name),))
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as err:
            if err.code() is grpc.StatusCode.UNAVAILABLE:  # Serve's proxy lost the replica, or is out of reach
                raise replica_unavailable(f"the replica of {self.name} is unavailable: {err.details()}",
                                          request_id=request.request_id) from err
            raise from_status(err.code().name, err.details() or "the replica failed",
                              request_id=request.request_id) from err
        finally:
            call.cancel()

    async def stats(self) -> dict[str, int]:
        return {}

    async def ready_replicas(self) -> int | None:
        """RUNNING replicas per the Ray dashboard; None without its URL or when it does not answer."""
        return None if self.status_url is None else await self._ready.get()

    async def _fetch_ready(self) -> int | None:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                reply = await client.get(f"{self.status_url}/api/serve/applications/")
            reply.raise_for_status()
            return replica_counts(reply.json(), self.name).get("RUNNING", 0)
        except (httpx.HTTPError, ValueError):
            return None

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.HEALTH_TIMEOUT_S)
        except (grpc.aio.AioRpcError, TimeoutError):
            return False
        return True

