"""The gRPC front door: herd.v1.Inference (ListModels, Generate, Chat), health and reflection.

Same gateway as HTTP. Errors are status codes with the message; the call's deadline bounds the
request; a cancelled call (client gone, deadline passed) closes the stream, which aborts the request
in the engine and frees its KV blocks.

Nothing is spent on a caller before its key is checked: a method's handler receives the request's bytes
and reads the `authorization` metadata first, so with tenancy on an unknown caller is UNAUTHENTICATED before
its message is parsed. What one connection may hold is bounded whatever its key (message size, calls at
once, ping rate: DoorLimits), and a streamed answer its client stops reading is aborted after
`stream_write_timeout_s` (the gateway then settles it for what was streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2
from grpc_status import rpc_status

from herd.engine.errors import HerdError
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import internal, invalid_request, metadata_credential, slow_reader
from herd.platform.gateway.forced_tools import constrain_to_calls
from herd.platform.gateway.grpc_tools import chat_tools, with_calls
from herd.platform.settings import DoorLimits
from herd.platform.telemetry.tracing import extract
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.protos.herd.v1 import inference_pb2_grpc as pb_grpc
from herd.workers.grpc_serving import add_health_and_reflection, listen, message_options

SERVICE = "herd.v1.Inference"
MAX_PING_STRIKES = 2  # pings closer than the limit a connection may send before it is closed

CallContext = grpc.aio.ServicerContext[Any, Any]
"""The context of a call to any of the service's methods (what the helpers below read or abort)."""

M = TypeVar("M", bound=Message)


def parse(message_type: type[M], data: bytes) -> M:
    """The request message of `data` (the handlers parse once the caller is known). Bytes that are not the
    message are INVALID_ARGUMENT: a deserializer that raised would make gRPC answer UNKNOWN and log a
    traceback per call (a client could flood the logs)."""
    try:
        return message_type.FromString(data)
    except DecodeError as err:
        name = message_type.DESCRIPTOR.full_name
        raise invalid_request(f"the request is not a valid {name} message: {err}") from None


def add_inference_service(service: InferenceService, server: grpc.aio.Server) -> None:
    """herd.v1.Inference on the server, as the generated add_InferenceServicer_to_server does, but its
    handlers take the request's bytes (no deserializer): each checks the caller, then parses."""
    handlers = {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, response_serializer=pb.ListModelsResponse.SerializeToString),
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate, response_serializer=pb.GenerateChunk.SerializeToString),
        "Chat": grpc.unary_stream_rpc_method_handler(
            service.Chat, response_serializer=pb.GenerateChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Server.add_registered_method_handlers (grpcio 1.63+) is missing from grpc-stubs.
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]


class InferenceService(pb_grpc.InferenceServicer):
    """The methods take the request's bytes (see add_inference_service) and write a stream's chunks with a
    deadline of `write_timeout_s` each."""

    def __init__(self, gateway: Gateway, *, write_timeout_s: float = DoorLimits().stream_write_timeout_s) -> None:
        self.gateway = gateway
        self.write_timeout_s = write_timeout_s

    async def ListModels(
        self, data: bytes, context: grpc.aio.ServicerContext[bytes, pb.ListModelsResponse],
    ) -> pb.ListModelsResponse:
        try:
            identity = await self._identity(context)
            parse(pb.ListModelsRequest, data)
            return pb.ListModelsResponse(models=self.gateway.list_models(identity))
        except HerdError as err:
            await _abort(context, err)
            raise  # _abort always raises; this keeps type checkers honest

    async def Generate(self, data: bytes, context: grpc.aio.ServicerContext[bytes, pb.GenerateChunk]) -> None:
        async def prepare(identity: object) -> Prepared:
            request = parse(pb.GenerateRequest, data)
            which = request.WhichOneof("prompt")
            if which is None:
                raise invalid_request("a prompt is needed: text or token_ids", param="prompt")
            if request.images:
                raise invalid_request("Generate takes no images; send them as image parts of a Chat call",
                                      param="images")
            prompt = request.text if which == "text" else list(request.token_ids.ids)
            return await self.gateway.prepare_text(request.model, prompt, request.sampling, identity=identity)

        await self._serve(prepare, context)

    async def Chat(self, data: bytes, context: grpc.aio.ServicerContext[bytes, pb.GenerateChunk]) -> None:
        names: frozenset[str] = frozenset()  # the functions a reply's calls may name, once the request is read

        async def prepare(identity: object) -> Prepared:
            nonlocal names
            request = parse(pb.ChatRequest, data)
            messages: list[dict[str, Any]] = []
            for m in request.messages:
                parts: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
                parts += [{"type": "image", "image": p.image} if p.WhichOneof("part") == "image"
                          else {"type": "text", "text": p.text} for p in m.parts]
                images = any(p["type"] == "image" for p in parts)
                content = parts if images else "".join(p["text"] for p in parts)
                messages.append({"role": m.role, "content": content})
            tools, choice, names = chat_tools(request)
            parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
            options = constrain_to_calls(request.sampling, tools, choice, parallel=parallel)
            return await self.gateway.prepare_chat(request.model, messages, options, tools=tools or None,
                                                   tool_choice=choice, identity=identity)

        await self._serve(prepare, context, tool_names=lambda: names)

    async def _serve(self, prepare: Callable[[object], Awaitable[Prepared]],
                     context: grpc.aio.ServicerContext[bytes, pb.GenerateChunk], *,
                     tool_names: Callable[[], frozenset[str]] = frozenset) -> None:
        """Authenticate, prepare, then write the gateway's chunks (the last with the reply's tool calls, where
        tool_names are offered); a chunk the client does not take within write_timeout_s closes the gateway's
        stream (which settles the request) and ends the call."""
        request_id = None
        try:
            prepared = await prepare(await self._identity(context))
            request_id = prepared.request.request_id
            remaining = context.time_remaining()
            parent = extract({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
            stream = self.gateway.stream(prepared, timeout_s=remaining, trace_parent=parent)
            async with contextlib.aclosing(stream), contextlib.aclosing(with_calls(stream, tool_names)) as chunks:
                async for chunk in chunks:
                    try:
                        await asyncio.wait_for(context.write(chunk), self.write_timeout_s)
                    except TimeoutError:
                        raise slow_reader(self.write_timeout_s) from None
        except HerdError as err:
            await _abort(context, err)
        except Exception as err:  # a bug, never a bare UNKNOWN: INTERNAL, its detail logged under the request id
            await _abort(context, internal(f"{type(err).__name__}: {err}", request_id=request_id))

    async def _identity(self, context: CallContext) -> object:
        """The caller, from `authorization` metadata ("Bearer <key>" or the bare key)."""
        metadata = dict(context.invocation_metadata() or ())
        return await self.gateway.identify(metadata_credential(str(metadata.get("authorization", ""))))


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
    private_key: bytes | None = None, client_ca: bytes | None = None, limits: DoorLimits | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the Inference server (with health and reflection); returns it and the bound port.

    With a PEM certificate chain and its key the port is TLS only; with a client CA too, a client must
    present a certificate that CA signed (refused in the handshake otherwise). `limits` (DoorLimits() when
    not given) bound what each connection may hold and how long a stream may wait for its reader."""
    limits = limits or DoorLimits()
    credentials = None
    if cert_chain is None or private_key is None:
        if cert_chain is not None or private_key is not None or client_ca is not None:
            raise ValueError("gRPC TLS needs both a certificate chain and its private key")
    else:
        credentials = grpc.ssl_server_credentials([(private_key, cert_chain)], root_certificates=client_ca,
                                                  require_client_auth=client_ca is not None)
    server = grpc.aio.server(options=door_options(limits))
    add_inference_service(InferenceService(gateway, write_timeout_s=limits.stream_write_timeout_s), server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs' health.pyi lacks aio
    add_health_and_reflection(server, SERVICE, health_servicer)
    bound = listen(server, host, port, credentials)
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def door_options(limits: DoorLimits) -> list[tuple[str, int]]:
    """The server options that hold every connection to `limits`, before any key is checked: messages up to
    grpc_max_message_bytes (a larger one is RESOURCE_EXHAUSTED unread), grpc_max_concurrent_streams calls at
    once (more wait in the client), and pings no closer than grpc_min_ping_interval_s, none while no call
    is open (MAX_PING_STRIKES such pings and the connection is closed)."""
    ping_ms = int(limits.grpc_min_ping_interval_s * 1000)
    return [*message_options(limits.grpc_max_message_bytes),
            ("grpc.max_concurrent_streams", limits.grpc_max_concurrent_streams),
            ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
            ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
            ("grpc.keepalive_permit_without_calls", 0)]
