"""The OpenAI-compatible HTTP front door (FastAPI): /v1/models, /v1/chat/completions, /v1/completions.

Errors are OpenAI-shaped bodies with the right status. A streamed request reads its first chunk
before answering, so a refusal (429, 503, ...) is still a proper status; a failure after that ends
the stream with an error event. A client that disconnects cancels its stream, which aborts the
request in the engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.context import Context
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from herd import __version__
from herd.engine.errors import HerdError
from herd.platform.gateway import openai_translate as translate
from herd.platform.gateway.body_limit import BodyLimitMiddleware
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import (
    bearer_credential,
    http_refusal,
    http_status,
    internal,
    invalid_request,
    openai_body,
)
from herd.platform.gateway.image_urls import ImageUrlPolicy
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
                  (404, "unknown model"), (413, "request body over the limit"), (429, "at capacity, retry"),
                  (503, "unavailable"), (504, "deadline exceeded"))
_ROUTER_ERRORS = _errors((400, "invalid request"), (401, "credential required"), (404, "not found"),
                         (409, "exists already"), (413, "request body over the limit"))
MAX_REQUEST_BODY_BYTES = 16 * 2**20


def create_app(gateway: Gateway, *, routers: Sequence[APIRouter] = (),
               max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES,
               image_urls: ImageUrlPolicy | None = None) -> FastAPI:
    """The HTTP door; `routers` adds more (the admin API) under the same error handling. A request body
    over `max_request_body_bytes` is refused with 413 before it is read; `image_urls` says which image
    URLs a chat may use."""
    image_urls = image_urls or ImageUrlPolicy()
    app = FastAPI(title="Herd", version=__version__, description="OpenAI-compatible API for Llama 4 models.")
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_request_body_bytes)
    for router in routers:
        app.include_router(router, responses=_ROUTER_ERRORS)
    _document_as_served(app)

    async def identity(request: Request) -> Any:
        """The caller, from `Authorization: Bearer <key>` (401 when tenancy is on and it is missing or bad)."""
        return await gateway.identify(bearer_credential(request.headers.get("authorization")))

    @app.exception_handler(HerdError)
    async def _refused(_: Request, err: HerdError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, err: HTTPException) -> JSONResponse:
        """Starlette's own refusals (no such route, wrong method, a body it cannot read), OpenAI-shaped."""
        response = error_response(http_refusal(err.status_code, str(err.detail)), status=err.status_code)
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first: Mapping[str, Any] = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
        return error_response(invalid_request(message, param=where or None))

    @app.get("/health", responses={503: {"description": "a model is not healthy"}})
    async def health() -> JSONResponse:
        states = {name: await b.healthy() for name, b in gateway.backends.items()}
        return JSONResponse({"models": states}, status_code=200 if all(states.values()) else 503)

    @app.get("/herd/stats")
    async def stats() -> dict[str, dict[str, int]]:
        """What each model's replica holds now (requests, KV blocks in use): for operators and tests."""
        return {name: await b.stats() for name, b in gateway.backends.items()}

    @app.get("/herd/controlplane")
    async def controlplane() -> dict[str, Any]:
        """The last decision per model, with its reason, when this process runs the control plane."""
        plane = gateway.control_plane
        return {"enabled": False} if plane is None else await plane.report()

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus text exposition: the gateway's requests and load, and the control plane's numbers when
        this process runs it (docs/METRICS.md)."""
        plane = gateway.control_plane
        text = generate_latest(gateway.telemetry.metrics.registry)
        if plane is not None:
            text += generate_latest(plane.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/herd/load")
    async def load() -> dict[str, dict[str, float | None]]:
        """Per-model load over the last minute as this gateway saw it (the control plane reads it)."""
        return gateway.load.snapshot()

    @app.get("/v1/models", response_model=ModelList, responses={401: _ERRORS[400] | {"description": "no key"}})
    async def list_models(request: Request) -> ModelList:
        caller = await identity(request)
        return ModelList(data=[ModelEntry(id=c.id, created=c.created, root=c.root, max_model_len=c.max_model_len)
                               for c in gateway.list_models(caller)])

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        prepared = await translate.prepare_chat(gateway, body, await identity(request), image_urls)
        chunks = gateway.stream(prepared, trace_parent=_trace_parent(request))
        if body.stream:
            return await _stream(chunks, lambda c: translate.chat_events(body, prepared, c))
        return translate.chat_completion(body, prepared, await translate.collect(chunks))

    @app.post("/v1/completions", response_model=Completion, responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prepared = await translate.prepare_completion(gateway, body, await identity(request))
        chunks = gateway.stream(prepared, trace_parent=_trace_parent(request))
        if body.stream:
            return await _stream(chunks, lambda c: translate.completion_events(body, prepared, c))
        return translate.completion(body, prepared, await translate.collect(chunks))

    return app


def _document_as_served(app: FastAPI) -> None:
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


def error_response(err: HerdError, *, status: int | None = None) -> JSONResponse:
    """The OpenAI-shaped answer to a refusal: its HTTP status (or `status`), and Retry-After when it has one."""
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return JSONResponse(openai_body(err), status_code=status or http_status(err), headers=headers)


async def _stream(
    chunks: AsyncGenerator[pb.GenerateChunk, None],
    events: Callable[[AsyncIterator[pb.GenerateChunk]], AsyncIterator[dict[str, Any]]],
) -> StreamingResponse | JSONResponse:
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except HerdError as err:
        await chunks.aclose()
        return error_response(err)

    async def replay() -> AsyncIterator[pb.GenerateChunk]:
        if first is not None:
            yield first
        async for chunk in chunks:
            yield chunk

    async def body() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            try:
                async for event in events(replay()):
                    yield translate.sse(event)
            except HerdError as err:
                yield translate.sse(openai_body(err))
            except Exception as err:
                yield translate.sse(openai_body(internal(f"{type(err).__name__}: {err}")))
            yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

