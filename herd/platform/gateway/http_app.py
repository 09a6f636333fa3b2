"""The OpenAI-compatible HTTP front door (FastAPI): /v1/models, /v1/chat/completions, /v1/completions, and a
cheap /health/live and /health/ready (operator endpoints are herd.platform.gateway.ops_app's, on their own port).

With tenancy on, the API key of a /v1 request is checked before a byte of its body is read: an unknown
client costs a header parse and a key lookup, never a JSON parse (the key comes as `Authorization: Bearer`, or
as `x-api-key`). Errors are OpenAI-shaped bodies with the right status (Anthropic-shaped on the Messages door,
herd.platform.gateway.messages_http). A streamed request reads its first chunk before answering, so a refusal
(429, 503, ...) is still a proper status; a failure after that ends the stream with an error event. A client
that disconnects, or stops reading for `stream_write_timeout_s`, ends its stream, which aborts the request in
the engine and settles it for what was streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import trace
from opentelemetry.context import Context
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from herd import __version__
from herd.engine.errors import HerdError
from herd.platform.batch.service import Batches
from herd.platform.gateway import openai_translate as translate
from herd.platform.gateway.anthropic_errors import door_body, door_status
from herd.platform.gateway.batch_http import add_batch_routes
from herd.platform.gateway.body_limit import ASGIApp, BodyLimitMiddleware, Message, Receive, Scope, Send
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import (
    header_credential,
    http_refusal,
    internal,
    invalid_request,
    openai_body,
)
from herd.platform.gateway.health import BackendHealth
from herd.platform.gateway.image_urls import ImageUrlPolicy
from herd.platform.gateway.messages_http import add_messages_routes
from herd.platform.gateway.openai_models import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    ErrorResponse,
    ModelEntry,
    ModelList,
)
from herd.platform.telemetry.tracing import extract
from herd.protos.herd.v1 import inference_pb2 as pb


def _errors(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": text} for code, text in pairs}


_ERRORS = _errors((400, "invalid request"), (401, "no key, or a bad one"), (403, "model not allowed for this key"),
                  (404, "unknown model"), (408, "the request body came too slowly"),
                  (413, "request body over the limit"), (429, "at capacity, retry"), (503, "unavailable"),
                  (504, "deadline exceeded"))
MAX_REQUEST_BODY_BYTES = 16 * 2**20
IDENTITY = "herd_identity"  # the request state's caller, set before the body is read
log = logging.getLogger(__name__)


def create_app(gateway: Gateway, *, max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES,
               read_timeout_s: float | None = None, stream_write_timeout_s: float | None = None,
               image_urls: ImageUrlPolicy | None = None, health: BackendHealth | None = None,
               responses: Any = None, batches: Batches | None = None) -> FastAPI:
    """The public HTTP door. A request body over `max_request_body_bytes` is refused with 413 before it is
    read, one not all in within `read_timeout_s` with 408; a stream whose client takes longer than
    `stream_write_timeout_s` to take one more event is aborted. `image_urls` says which image URLs a chat may
    use; `health` is the cached backend health /health/ready answers from; `responses` is the Responses API's
    store (herd.platform.tenancy.responses.ResponseStore; None: in memory); `batches`, when given, serves the
    Files and Batch APIs (herd.platform.gateway.batch_http)."""
    image_urls = image_urls or ImageUrlPolicy()
    health = health or BackendHealth(gateway)
    app = FastAPI(title="Herd", version=__version__, description="OpenAI-compatible API for Llama 4 models.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_request_body_bytes, read_timeout_s=read_timeout_s)
    app.add_middleware(AuthenticateFirst, gateway=gateway)  # outermost: before the body limit reads anything
    install_error_handlers(app)
    document_as_served(app)

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        """200 while this process serves."""
        return {"status": "live"}

    @app.get("/health/ready", responses={503: {"description": "shutting down, or a model was not healthy"}})
    async def ready() -> JSONResponse:
        """200 when this gateway takes requests and every model's backend was healthy at its last check
        (checked at most every few seconds, whatever the probe rate)."""
        if gateway.closing:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        states = await health.states()
        ok = all(states.values())
        return JSONResponse({"ready": ok, "models": states}, status_code=200 if ok else 503)

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[400] | {"description": "no key"}})
    async def list_models(request: Request) -> ModelList:
        caller = _identity(request)
        return ModelList(data=[ModelEntry(id=c.id, created=c.created, root=c.root, parent=c.parent or None,
                                          max_model_len=c.max_model_len) for c in gateway.list_models(caller)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prepared = await translate.prepare_chat(gateway, body, _identity(request), image_urls)
        chunks = translate.named_errors(gateway.stream(prepared, trace_parent=_trace_parent(request)),
                                        translate.constraint_field(body))
        if body.stream:
            return await _stream(chunks, lambda c: translate.chat_events(body, prepared, c), stream_write_timeout_s,
                                 prepared.request.request_id)
        return translate.chat_completion(body, prepared, await translate.collect(chunks))

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prepared = await translate.prepare_completion(gateway, body, _identity(request))
        chunks = translate.named_errors(gateway.stream(prepared, trace_parent=_trace_parent(request)),
                                        translate.constraint_field(body))
        if body.stream:
            return await _stream(chunks, lambda c: translate.completion_events(body, prepared, c),
                                 stream_write_timeout_s, prepared.request.request_id)
        return translate.completion(body, prepared, await translate.collect(chunks))

    add_messages_routes(app, gateway, image_urls=image_urls, stream_write_timeout_s=stream_write_timeout_s)
    from herd.platform.gateway.responses_http import add_responses_routes  # it imports this module
    add_responses_routes(app, gateway, store=responses, image_urls=image_urls,
                         stream_write_timeout_s=stream_write_timeout_s)
    if batches is not None:
        add_batch_routes(app, batches, _identity)
    return app


class AuthenticateFirst:
    """ASGI middleware: a /v1 request's caller is known (its key checked, 401 otherwise) before anything
    reads its body; the endpoints take it from the request state."""

    def __init__(self, app: ASGIApp, *, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", ()) if k in (b"authorization", b"x-api-key")}
        try:
            identity = await self.gateway.identify(header_credential(headers.get(b"authorization"),
                                                                     headers.get(b"x-api-key")))
        except HerdError as err:
            # A JSON answer: it never reads the body.
            await error_response(err, path=scope["path"])(scope, receive, send)
            return
        scope.setdefault("state", {})[IDENTITY] = identity
        await self.app(scope, receive, send)


def _identity(request: Request) -> Any:
    """The caller AuthenticateFirst found (None without tenancy)."""
    return request.scope.get("state", {}).get(IDENTITY)


def install_error_handlers(app: FastAPI) -> None:
    """Answers for HerdErrors, Starlette's own refusals and invalid bodies (400, never 422), in the shape of the
    request path's door: OpenAI's, Anthropic's on /v1/messages."""

    @app.exception_handler(HerdError)
    async def _refused(request: Request, err: HerdError) -> JSONResponse:
        return error_response(err, path=request.url.path)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, wrong method, a body it cannot read), in the door's shape."""
        response = error_response(http_refusal(err.status_code, str(err.detail)), status=err.status_code,
                                  path=request.url.path)
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first: Mapping[str, Any] = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return error_response(invalid_request(message, param=where or None), path=request.url.path)


def document_as_served(app: FastAPI) -> None:
    """The OpenAPI document says what the door does: a refused body is 400 with an OpenAI error (never
    FastAPI's 422), and a streamed answer is text/event-stream of chunk events ending in [DONE]."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        documented = (ChatCompletionChunk, CompletionChunk, ErrorResponse)
        _, defs = models_json_schema([(m, "serialization") for m in documented],
                                     ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        bad_request = {"description": "invalid request",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", bad_request)
        for path, chunk in (("/v1/chat/completions", ChatCompletionChunk), ("/v1/completions", CompletionChunk)):
            if path not in schema.get("paths", {}):
                continue  # the operator app serves no streams
            content = schema["paths"][path]["post"]["responses"]["200"]["content"]
            content["text/event-stream"] = {"schema": _event_schema(chunk.__name__)}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _event_schema(chunk: str) -> dict[str, Any]:
    """One server-sent event: a chunk, an error that ends the stream, or the closing [DONE]."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
    ]}}}


def _trace_parent(request: Request) -> Context | None:
    """The parent of the request's span: FastAPI's own HTTP server span when it traces (it has continued the
    caller's traceparent), else the caller's traceparent header itself."""
    return None if trace.get_current_span().get_span_context().is_valid else extract(request.headers)


def error_response(err: HerdError, *, status: int | None = None, path: str = "") -> JSONResponse:
    """The answer to a refusal in the shape of `path`'s door (OpenAI's; Anthropic's on /v1/messages): its HTTP
    status (or `status`), and Retry-After when it has one."""
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return JSONResponse(door_body(path, err), status_code=status or door_status(path, err), headers=headers)


async def first_chunk(chunks: AsyncGenerator[pb.GenerateChunk, None],
                      ) -> tuple[pb.GenerateChunk | None, HerdError | None]:
    """A stream's first chunk (None when it ended at once), or the refusal it raised before any (the stream then
    closed): read before a streamed answer is started, so that a refusal is still a proper status."""
    try:
        return await anext(chunks), None
    except StopAsyncIteration:
        return None, None
    except HerdError as err:
        await chunks.aclose()
        return None, err


async def _stream(
    chunks: AsyncGenerator[pb.GenerateChunk, None],
    events: Callable[[AsyncIterator[pb.GenerateChunk]], AsyncIterator[dict[str, Any]]],
    write_timeout_s: float | None,
    request_id: str,
) -> StreamingResponse | JSONResponse:
    first, refused = await first_chunk(chunks)
    if refused is not None:
        return error_response(refused)

    async def replay() -> AsyncIterator[pb.GenerateChunk]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    async def body() -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(chunks):
            try:
                async for event in events(replay()):
                    yield translate.sse(event)
            except HerdError as err:
                yield translate.sse(openai_body(err))
            except Exception as err:
                yield translate.sse(openai_body(internal(f"{type(err).__name__}: {err}", request_id=request_id)))
            yield b"data: [DONE]\n\n"

    return DeadlineStreamingResponse(body(), write_timeout_s=write_timeout_s, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})


class _ClientStalled(Exception):
    """A send of the stream did not complete within the write deadline: the client stopped reading."""


class DeadlineStreamingResponse(StreamingResponse):
    """A StreamingResponse whose every send must complete within `write_timeout_s` (None: no deadline), and
    whose body generator is closed however the response ends (a stalled client, a disconnect, the end), so
    what it streams from (the gateway's request) is aborted and settled at once, not when it is collected."""

    def __init__(self, content: AsyncGenerator[bytes, None], *, write_timeout_s: float | None,
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.content = content
        self.write_timeout_s = write_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout_s = self.write_timeout_s

        async def timed_send(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), timeout_s)
            except TimeoutError:
                raise _ClientStalled from None

        try:
            await super().__call__(scope, receive, send if timeout_s is None else timed_send)
        except _ClientStalled:
            # uvicorn closes the connection: the response is incomplete.
            log.warning("a streamed answer was aborted: its client read nothing for %g s", timeout_s)
        finally:
            await self.content.aclose()
