"""The OpenAI Responses API door: POST /v1/responses (whole or streamed), GET and DELETE /v1/responses/{id}.

A response is a chat on the gateway's one request path (Gateway.prepare_chat, Gateway.stream), so tenancy,
limits, the usage ledger and telemetry apply as they do to /v1/chat/completions. With `store` (the default)
a finished response is kept per tenant (herd.platform.tenancy.responses) for GET and for a follow-up's
previous_response_id; an id that is unknown, expired or another tenant's is 404, never 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from herd.engine.errors import Code, HerdError
from herd.platform.gateway import openai_translate as chat_translate
from herd.platform.gateway import responses_translate as translate
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.errors import database_unavailable, internal, openai_body
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes
from herd.platform.gateway.openai_models import ErrorResponse
from herd.platform.gateway.responses_events import response_events
from herd.platform.gateway.responses_models import DeletedResponse, ResponseObject, ResponseRequest, ResponseUsage
from herd.platform.tenancy.responses import ResponseStore, Stored
from herd.protos.herd.v1 import inference_pb2 as pb

T = TypeVar("T")
log = logging.getLogger(__name__)
TEXT_FORMAT = "text.format"  # the request field a replica's refusal of the output constraint is renamed to


def _errors(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": text} for code, text in pairs}


_CREATE_ERRORS = _errors((400, "invalid request, a malformed input item named"), (401, "no key, or a bad one"),
                         (403, "model not allowed for this key"),
                         (404, "unknown model, or previous_response_id not found"), (408, "the body came too slowly"),
                         (413, "request body over the limit"), (429, "at capacity, retry"), (503, "unavailable"),
                         (504, "deadline exceeded"))
_EVENT = {"type": "object", "required": ["type", "sequence_number"], "properties": {
    "type": {"type": "string", "pattern": r"^(response\.[a-z_.]+|error)$"},
    "sequence_number": {"type": "integer", "minimum": 0}}}
_CREATE_ERRORS[200] = {"content": {"text/event-stream": {"schema": {
    "type": "object", "required": ["event", "data"], "description": "with stream: typed events, response.created "
    "first, response.completed or response.incomplete last (an `error` event when it fails midway)",
    "properties": {"event": {"type": "string"},
                   "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": _EVENT}}}}}}
_BY_ID_ERRORS = _errors((401, "no key, or a bad one"), (404, "no such response (unknown, expired, or another "
                        "tenant's)"), (503, "the database that keeps responses is unavailable, retry"))


def add_responses_routes(app: FastAPI, gateway: Gateway, *, store: ResponseStore | None = None,
                         image_urls: ImageUrlPolicy | None = None,
                         stream_write_timeout_s: float | None = None) -> ResponseStore:
    """Add the Responses API's routes; `store` keeps responses (None: in this process's memory only)."""
    from herd.platform.gateway.http_app import IDENTITY, _trace_parent  # http_app imports this module

    kept = store or ResponseStore.in_memory()
    policy = image_urls or ImageUrlPolicy()

    def tenant(request: Request) -> str:
        identity = request.scope.get("state", {}).get(IDENTITY)
        return gateway.guard.context(identity).tenant_id if gateway.guard is not None else "default"

    @app.post("/v1/responses", response_model=ResponseObject, responses=_CREATE_ERRORS)
    async def create_response(body: ResponseRequest, request: Request) -> Any:
        """A response to `input` (a string or items) after `instructions` and, with previous_response_id, the
        conversation of that stored response."""
        owner, identity = tenant(request), request.scope.get("state", {}).get(IDENTITY)
        previous = await _previous(kept, owner, body.previous_response_id)
        history = previous.conversation if previous is not None else []
        new_messages = translate.input_messages(body)
        messages = translate.chat(body, history, new_messages)
        offered, choice = translate.offered_tools(body)

        async def load_image(url: str) -> bytes:
            return await image_bytes(url, policy)

        options = translate.sampling(body)
        try:
            prepared = await gateway.prepare_chat(body.model, messages, options, tools=offered or None,
                                                  tool_choice=choice, identity=identity, load_image=load_image)
        except HerdError as err:
            raise _input_named(err, _constraint_field(body)) from None
        chunks = chat_translate.named_errors(gateway.stream(prepared, trace_parent=_trace_parent(request)),
                                             _constraint_field(body))
        response_id = translate.new_id("resp")
        names = translate.tool_names(body)

        async def finish(done: translate.Reply, used: ResponseUsage) -> ResponseObject:
            status = "incomplete" if done.incomplete else "completed"
            finished = translate.response_object(body, response_id, output=done.output, status=status, usage=used)
            if body.store:
                await _database(
                    kept.save, owner, response_id=response_id, model=body.model, status=status,
                    previous_response_id=body.previous_response_id, body=translate.dumped(finished),
                    conversation=[*history, *new_messages, done.message])
            return finished

        if body.stream:
            started = translate.response_object(body, response_id, output=[], status="in_progress")
            events = response_events(started, chunks, prompt_tokens=prepared.prompt_tokens, names=names,
                                     finish=finish)
            return await _stream(events, chunks, prepared.request.request_id, stream_write_timeout_s)
        got = (await chat_translate.collect(chunks))[0]
        done = translate.reply(got.text, got.finish_reason, names)
        return await finish(done, translate.usage(prepared.prompt_tokens, got))

    @app.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=_BY_ID_ERRORS)
    async def get_response(response_id: str, request: Request) -> Any:
        """A stored response of the caller's tenant, as it was returned."""
        found = await _database(kept.get, tenant(request), response_id)
        if found is None:
            raise _not_found(response_id, "response_id")
        return JSONResponse(found.body)

    @app.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=_BY_ID_ERRORS)
    async def delete_response(response_id: str, request: Request) -> DeletedResponse:
        """Forget a stored response of the caller's tenant."""
        if not await _database(kept.delete, tenant(request), response_id):
            raise _not_found(response_id, "response_id")
        return DeletedResponse(id=response_id)

    return kept


async def _previous(store: ResponseStore, tenant: str, response_id: str | None) -> Stored | None:
    if response_id is None:
        return None
    found = await _database(store.get, tenant, response_id)
    if found is None:
        raise _not_found(response_id, "previous_response_id")
    return found


async def _database(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A store call off the event loop; the database failing is 503 (retry), not a 500."""
    try:
        return await asyncio.to_thread(call, *args, **kwargs)
    except SQLAlchemyError as err:
        log.warning("the responses store failed: %s: %s", type(err).__name__, err)
        raise database_unavailable() from None


def _not_found(response_id: str, param: str) -> HerdError:
    return HerdError(Code.NOT_FOUND, f"Response with id '{response_id:.100}' not found.", param=param,
                     reason="not_found")


def _constraint_field(body: ResponseRequest) -> str:
    return "tool_choice" if body.tool_choice not in ("auto", "none") and body.tools else TEXT_FORMAT


def _input_named(err: HerdError, field: str) -> HerdError:
    """A refusal as this door names its fields: the chat's messages are its input; the wire's structured field
    its text.format (or its forced tool_choice)."""
    if err.param == "messages":
        err.param = "input"
    elif err.param == "structured":
        err.param = field
    return err


async def _stream(events: AsyncGenerator[dict[str, Any], None], chunks: AsyncGenerator[pb.GenerateChunk, None],
                  request_id: str, write_timeout_s: float | None) -> StreamingResponse | JSONResponse:
    """The events as server-sent events; a refusal before the first token is still a proper status (the events
    are read up to the first that needs a chunk: response.created is ready at once, so the stream is primed
    by pulling the chunk stream's first chunk through them)."""
    from herd.platform.gateway.http_app import DeadlineStreamingResponse, error_response

    primed: list[dict[str, Any]] = []
    try:
        async for first in events:
            primed.append(first)
            if first["type"] not in ("response.created", "response.in_progress"):
                break
    except HerdError as err:
        await events.aclose()
        await chunks.aclose()
        return error_response(err)

    async def body() -> AsyncGenerator[bytes, None]:
        sequence = len(primed)
        async with contextlib.aclosing(chunks), contextlib.aclosing(events):
            try:
                for event in primed:
                    yield sse(event)
                async for event in events:
                    sequence = event["sequence_number"] + 1
                    yield sse(event)
            except HerdError as err:
                yield sse(_error_event(openai_body(err), sequence))
            except Exception as err:
                failure = internal(f"{type(err).__name__}: {err}", request_id=request_id)
                yield sse(_error_event(openai_body(failure), sequence))

    return DeadlineStreamingResponse(body(), write_timeout_s=write_timeout_s, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})


def _error_event(body: dict[str, Any], sequence: int) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    return {"type": "error", "sequence_number": sequence, "code": error.get("code") or error.get("type"),
            "message": error["message"], "param": error.get("param")}


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
