"""The gRPC front door: herd.v1.Inference (ListModels, Generate, Chat), health and reflection.

Same gateway as HTTP. Errors are status codes with the message; the call's deadline bounds the
request; a cancelled call (client gone, deadline passed) closes the stream, which aborts the request
in the engine and frees its KV blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import GatewayError, invalid_request
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc

SERVICE = "herd.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 2**20

GrpcTenantResolver = Callable[[grpc.aio.ServicerContext], Awaitable[pb.TenantContext | None]]


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway, tenant_resolver: GrpcTenantResolver | None = None) -> None:
        self.gateway = gateway
        self.tenant_resolver = tenant_resolver

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self.gateway.list_models())

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async def prepare() -> Prepared:
            which = request.WhichOneof("prompt")
            if which is None:
                raise invalid_request("a prompt is needed: text or token_ids", param="prompt")
            prompt = request.text if which == "text" else list(request.token_ids.ids)
            return self.gateway.prepare_text(request.model, prompt, request.sampling,
                                             tenant=await self._tenant(context), request_id=request.request_id)

        async for chunk in self._serve(prepare, context):
            yield chunk

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async def prepare() -> Prepared:
            messages = []
            for m in request.messages:
                if any(p.WhichOneof("part") == "image" for p in m.parts):
                    raise invalid_request("image inputs are not supported by this server yet", param="messages")
                text = m.content + "".join(p.text for p in m.parts)
                messages.append({"role": m.role, "content": text})
            return self.gateway.prepare_chat(request.model, messages, request.sampling,
                                             tenant=await self._tenant(context), request_id=request.request_id)

        async for chunk in self._serve(prepare, context):
            yield chunk

    async def _serve(
        self, prepare: Callable[[], Awaitable[Prepared]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            prepared = await prepare()
            remaining = context.time_remaining()
            async with contextlib.aclosing(self.gateway.stream(prepared, timeout_s=remaining)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except GatewayError as err:
            await _abort(context, err)

    async def _tenant(self, context: grpc.aio.ServicerContext) -> pb.TenantContext | None:
        return await self.tenant_resolver(context) if self.tenant_resolver else None


async def _abort(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    if err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(err.retry_after_s)),))
    await context.abort(getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL), err.message)


async def start_grpc(
    gateway: Gateway, *, host: str = "127.0.0.1", port: int = 50051, tenant_resolver: GrpcTenantResolver | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the Inference server (with health and reflection); returns it and the bound port."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_InferenceServicer_to_server(InferenceService(gateway, tenant_resolver), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
