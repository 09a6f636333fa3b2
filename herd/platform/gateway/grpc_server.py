"""The gRPC front door: herd.v1.Inference (ListModels, Generate, Chat), health and reflection.

Same gateway as HTTP. Errors are status codes with the message; the call's deadline bounds the
request; a cancelled call (client gone, deadline passed) closes the stream, which aborts the request
in the engine and frees its KV blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2
from grpc_status import rpc_status

from herd.engine.errors import HerdError
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import bearer_credential, internal, invalid_request
from herd.platform.telemetry.tracing import extract
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.grpc_serving import add_health_and_reflection, listen, message_options

SERVICE = "herd.v1.Inference"
MAX_MESSAGE_BYTES = 64 * 2**20

CallContext = grpc.aio.ServicerContext[Any, Any]
"""The context of a call to any of the service's methods (what the helpers below read or abort)."""

GrpcTenantResolver = Callable[[CallContext], Awaitable[pb.TenantContext | None]]


class Unreadable:
    """A request whose bytes are not the method's message. The deserializer returns it instead of raising,
    which would make gRPC answer UNKNOWN and log a traceback per call (a client could flood the logs)."""

    def __init__(self, message_type: type[Message], error: Exception) -> None:
        self.text = f"the request is not a valid {message_type.DESCRIPTOR.full_name} message: {error}"


def _parse(message_type: type[Message]) -> Callable[[bytes], Message | Unreadable]:
    def parse(data: bytes) -> Message | Unreadable:
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return Unreadable(message_type, err)

    return parse


async def _refuse_unreadable(request: object, context: CallContext) -> None:
    if isinstance(request, Unreadable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)


def add_inference_service(service: InferenceService, server: grpc.aio.Server) -> None:
    """herd.v1.Inference on the server, as the generated add_InferenceServicer_to_server does, but with
    deserializers that never raise (an unreadable request is INVALID_ARGUMENT, see Unreadable)."""
    handlers = {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, request_deserializer=_parse(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, request_deserializer=_parse(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString),
        "Chat": grpc.unary_stream_rpc_method_handler(
            service.Chat, request_deserializer=_parse(pb.ChatRequest),
            response_serializer=pb.GenerateChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Server.add_registered_method_handlers (grpcio 1.63+) is missing from grpc-stubs.
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway, tenant_resolver: GrpcTenantResolver | None = None) -> None:
        self.gateway = gateway
        self.tenant_resolver = tenant_resolver

    async def ListModels(
        self, request: pb.ListModelsRequest,
        context: grpc.aio.ServicerContext[pb.ListModelsRequest, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        await _refuse_unreadable(request, context)
        try:
            return pb.ListModelsResponse(models=self.gateway.list_models(await self._identity(context)))
        except HerdError as err:
            await _abort(context, err)
            raise  # _abort always raises; this keeps type checkers honest

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateChunk]
    ) -> AsyncIterator[pb.GenerateChunk]:
        await _refuse_unreadable(request, context)

        async def prepare() -> Prepared:
            which = request.WhichOneof("prompt")
            if which is None:
                raise invalid_request("a prompt is needed: text or token_ids", param="prompt")
            if request.images:
                raise invalid_request("Generate takes no images; send them as image parts of a Chat call",
                                      param="images")
            prompt = request.text if which == "text" else list(request.token_ids.ids)
            return await self.gateway.prepare_text(request.model, prompt, request.sampling,
                                             identity=await self._identity(context))

        async for chunk in self._serve(prepare, context):
            yield chunk

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext[pb.ChatRequest, pb.GenerateChunk]
    ) -> AsyncIterator[pb.GenerateChunk]:
        await _refuse_unreadable(request, context)

        async def prepare() -> Prepared:
            messages: list[dict[str, Any]] = []
            for m in request.messages:
                parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
                parts += [{"type": "image", "image": p.image} if p.WhichOneof("part") == "image"
                          else {"type": "text", "text": p.text} for p in m.parts]
                images = any(p["type"] == "image" for p in parts)
                content = parts if images else "".join(p["text"] for p in parts)
                messages.append({"role": m.role, "content": content})
            return await self.gateway.prepare_chat(request.model, messages, request.sampling,
                                             identity=await self._identity(context))

        async for chunk in self._serve(prepare, context):
            yield chunk

    async def _serve(
        self, prepare: Callable[[], Awaitable[Prepared]], context: grpc.aio.ServicerContext[Any, pb.GenerateChunk]
    ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            prepared = await prepare()
            remaining = context.time_remaining()
            parent = extract({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
            stream = self.gateway.stream(prepared, timeout_s=remaining, trace_parent=parent)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        except HerdError as err:
            await _abort(context, err)
        except Exception as err:  # a bug, never a bare UNKNOWN: INTERNAL with what happened
            await _abort(context, internal(f"{type(err).__name__}: {err}"))

    async def _identity(self, context: CallContext) -> object:
        """The caller, from `authorization` metadata ("Bearer <key>" or the bare key)."""
        metadata = dict(context.invocation_metadata() or ())
        value = str(metadata.get("authorization", "")).strip()
        return await self.gateway.identify(bearer_credential(value) or value or None)


async def _abort(context: CallContext, err: HerdError) -> None:
    """End the call with the error's status; a retriable one carries google.rpc.RetryInfo (and retry-after)."""
    code = getattr(grpc.StatusCode, err.code.value)
    if err.retry_after_s is None:
        await context.abort(code, err.message)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=err.retry_after_s)))
    rich = status_pb2.Status(code=code.value[0], message=err.message, details=[detail])
    context.set_trailing_metadata((("retry-after", str(err.retry_after_s)),))
    await context.abort_with_status(rpc_status.to_status(rich))  # type: ignore[attr-defined]  # not in grpc-stubs


async def start_grpc(
    gateway: Gateway, *, host: str = "127.0.0.1", port: int = 50051, cert_chain: bytes | None = None,
    private_key: bytes | None = None, client_ca: bytes | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the Inference server (with health and reflection); returns it and the bound port.

    With a PEM certificate chain and its key the port is TLS only; with a client CA too, a client must
    present a certificate that CA signed (refused in the handshake otherwise)."""
    credentials = None
    if cert_chain is None or private_key is None:
        if cert_chain is not None or private_key is not None or client_ca is not None:
            raise ValueError("gRPC TLS needs both a certificate chain and its private key")
    else:
        credentials = grpc.ssl_server_credentials([(private_key, cert_chain)], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
    server = grpc.aio.server(options=message_options(MAX_MESSAGE_BYTES))
    add_inference_service(InferenceService(gateway), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs' health.pyi lacks aio
    add_health_and_reflection(server, SERVICE, health_servicer)
    bound = listen(server, host, port, credentials)
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
