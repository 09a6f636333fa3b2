"""The gRPC front door: herd.v1.Inference (ListModels, Generate, Chat), health and reflection.

Same gateway as HTTP. Errors are status codes with the message; the call's deadline bounds the
request; a cancelled call (client gone, deadline passed) closes the stream, which aborts the request
in the engine and frees its KV blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import GatewayError, invalid_request
from herd.platform.telemetry.tracing import extract
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
        try:
            return pb.ListModelsResponse(models=self.gateway.list_models(await self._identity(context)))
        except GatewayError as err:
            await _abort(context, err)
            raise  # _abort always raises; this keeps type checkers honest

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        async def prepare() -> Prepared:
            which = request.WhichOneof("prompt")
            if which is None:
                raise invalid_request("a prompt is needed: text or token_ids", param="prompt")
            prompt = request.text if which == "text" else list(request.token_ids.ids)
            return self.gateway.prepare_text(request.model, prompt, request.sampling,
                                             identity=await self._identity(context))

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
                                             identity=await self._identity(context))

        async for chunk in self._serve(prepare, context):
            yield chunk

    async def _serve(
        self, prepare: Callable[[], Awaitable[Prepared]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            prepared = await prepare()
            remaining = context.time_remaining()
            parent = extract({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
            stream = self.gateway.stream(prepared, timeout_s=remaining, trace_parent=parent)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        except GatewayError as err:
            await _abort(context, err)

    async def _identity(self, context: grpc.aio.ServicerContext) -> object:
        """The caller, from `authorization` metadata ("Bearer <key>" or the bare key)."""
        metadata = dict(context.invocation_metadata() or ())
        value = str(metadata.get("authorization", "")).strip()
        credential = value[7:].strip() if value.lower().startswith("bearer ") else value
        return await self.gateway.identify(credential or None)


async def _abort(context: grpc.aio.ServicerContext, err: GatewayError) -> None:
    """End the call with the error's status; a retriable one carries google.rpc.RetryInfo (and retry-after)."""
    code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)
    if err.retry_after_s is None:
        await context.abort(code, err.message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=err.retry_after_s)))
    rich = status_pb2.Status(code=code.value[0], message=err.message, details=[detail])
    context.set_trailing_metadata((("retry-after", str(err.retry_after_s)),))
    await context.abort_with_status(rpc_status.to_status(rich))


async def start_grpc(gateway: Gateway, *, host: str = "127.0.0.1", port: int = 50051) -> tuple[grpc.aio.Server, int]:
    """Start the Inference server (with health and reflection); returns it and the bound port."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_InferenceServicer_to_server(InferenceService(gateway), server)
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
