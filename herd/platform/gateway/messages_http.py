"""The Anthropic Messages door: POST /v1/messages over the gateway's one request path (a Messages request is a
chat), so tenancy, limits, the ledger and telemetry apply unchanged.

The caller's key comes as `x-api-key` or `Authorization: Bearer` (AuthenticateFirst reads either); any
`anthropic-version` is accepted. Refusals on this path are Anthropic-shaped (herd.platform.gateway.
anthropic_errors; the app's error handlers choose the shape by path). A streamed request reads its first chunk
before answering, so a refusal is still a proper status; a failure after that ends the stream with an `error`
event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request

from herd.engine.errors import HerdError
from herd.platform.gateway import anthropic_translate as translate
from herd.platform.gateway.anthropic_errors import MESSAGES_PATH, anthropic_body
from herd.platform.gateway.anthropic_models import AnthropicError, Message, MessagesRequest, StreamEvent
from herd.platform.gateway.anthropic_stream import message_events, sse
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import internal
from herd.platform.gateway.image_urls import ImageUrlPolicy
from herd.platform.gateway.openai_translate import collect, named_errors
from herd.protos.herd.v1 import inference_pb2 as pb

_REFUSALS = {400: "invalid request (max_tokens missing, a bad block, ...)", 401: "no key, or a bad one",
             403: "model not allowed for this key", 404: "unknown model", 408: "the request body came too slowly",
             413: "request body over the limit", 429: "a limit of the tenant's, retry after Retry-After",
             500: "internal error", 504: "deadline exceeded", 529: "overloaded, retry after Retry-After"}
_EVENT = {"type": "object", "required": ["event", "data"], "properties": {
    "event": {"enum": ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
                       "message_delta", "message_stop", "error"]},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
        StreamEvent.model_json_schema(), {"$ref": "#/components/schemas/AnthropicError"}]}},
}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the Message; with stream, Anthropic's server-sent events",
          "content": {"text/event-stream": {"schema": _EVENT}}},
    **{code: {"model": AnthropicError, "description": text} for code, text in _REFUSALS.items()},
}


def add_messages_routes(app: FastAPI, gateway: Gateway, *, image_urls: ImageUrlPolicy,
                        stream_write_timeout_s: float | None) -> None:
    """POST /v1/messages on `app` (create_app's), served by `gateway`."""
    # http_app imports this module to call this function: its names are taken once it is loaded.
    from herd.platform.gateway.http_app import (
        DeadlineStreamingResponse,
        _identity,
        _trace_parent,
        error_response,
        first_chunk,
    )

    @app.post("/v1/messages", response_model=Message, responses=_RESPONSES, summary="Create a Message (Anthropic)")
    async def messages(body: MessagesRequest, request: Request) -> Any:
        """Anthropic's Messages API: text, images, system, stop_sequences, tools and tool results; whole or
        streamed. Not served: extended thinking, prefill (a final assistant turn), server tools, documents."""
        prepared = await translate.prepare(gateway, body, _identity(request), image_urls)
        chunks = named_errors(gateway.stream(prepared, trace_parent=_trace_parent(request)),
                              translate.constraint_field(body))
        if not body.stream:
            return translate.message(body, prepared, (await collect(chunks))[0])
        first, refused = await first_chunk(chunks)
        if refused is not None:
            return error_response(refused, path=MESSAGES_PATH)
        return DeadlineStreamingResponse(_body(body, prepared, first, chunks), write_timeout_s=stream_write_timeout_s,
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _body(request: MessagesRequest, prepared: Prepared, first: pb.GenerateChunk | None,
                chunks: AsyncGenerator[pb.GenerateChunk, None]) -> AsyncGenerator[bytes, None]:
    async def replay() -> AsyncIterator[pb.GenerateChunk]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    async with contextlib.aclosing(chunks):
        try:
            async for kind, data in message_events(request, prepared, replay()):
                yield sse(kind, data)
        except HerdError as err:
            yield sse("error", anthropic_body(err))
        except Exception as err:
            failure = internal(f"{type(err).__name__}: {err}", request_id=prepared.request.request_id)
            yield sse("error", anthropic_body(failure))
