"""One batch line run through the gateway's one request path, as the HTTP door runs the same body: the same
translation, admission (the tenant's limits), usage ledger and telemetry, with two differences. The request
id is the line's own (the same on every attempt: one ledger row per line), and the engine sees the request as
the tenant's batch class, "<tenant>:batch", with a fraction of the tenant's fair-share weight, so interactive
traffic of every tenant goes first.

The ledger's row is keyed by the line's id (admission), the engine's request by the attempt's (the line's id
and a suffix). The outcome is the line's output or error line, or None when the request was refused for now
(a tenant limit, the gateway at capacity or shutting down) and the line should be tried again later.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from herd.engine.errors import Code, HerdError
from herd.platform.batch.output_lines import request_id, response_line
from herd.platform.gateway import openai_translate as translate
from herd.platform.gateway import responses_translate as responses
from herd.platform.gateway.core import Gateway, Prepared
from herd.platform.gateway.errors import http_status, internal, invalid_request, openai_body
from herd.platform.gateway.image_urls import ImageUrlPolicy, image_bytes
from herd.platform.gateway.openai_models import ChatCompletionRequest, CompletionRequest
from herd.platform.gateway.responses_models import ResponseObject, ResponseRequest

RETRYABLE = (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE)
"""A refusal with one of these codes leaves the line pending: it says "not now", not "never"."""
_NO_URLS = ImageUrlPolicy()  # a line's images are data: URLs (no fetching for offline work)


async def run_line(gateway: Gateway, identity: Any, *, batch_id: str, endpoint: str, index: int, custom_id: str,
                   body: dict[str, Any], weight_factor: float) -> tuple[str, dict[str, Any]] | None:
    """("completed" | "failed", its output or error line), or None to try the line again later."""
    rid = request_id(batch_id, index)
    try:
        status_code, answer = await _answer(gateway, identity, endpoint, body, rid, weight_factor)
    except HerdError as err:
        if err.code in RETRYABLE and err.reason != "request_too_large":
            return None
        status_code, answer = http_status(err), openai_body(err)
    except Exception as err:  # a bug must not make the line run forever: it fails, the batch goes on
        status_code, answer = 500, openai_body(internal(f"{type(err).__name__}: {err}", request_id=rid))
    line = response_line(batch_id, index, custom_id, status_code, answer)
    return ("completed" if status_code == 200 else "failed"), line


async def _answer(gateway: Gateway, identity: Any, endpoint: str, body: dict[str, Any], rid: str,
                  weight_factor: float) -> tuple[int, dict[str, Any]]:
    if body.get("stream"):
        raise invalid_request("stream is not taken in a batch (each answer is written whole)", param="stream")
    if endpoint == "/v1/chat/completions":
        chat = _parsed(ChatCompletionRequest, body)
        prepared = await translate.prepare_chat(gateway, chat, identity, _NO_URLS, request_id=rid)
        chunks = translate.named_errors(gateway.stream(_batch_class(prepared, weight_factor)),
                                        translate.constraint_field(chat))
        reply: Any = translate.chat_completion(chat, prepared, await translate.collect(chunks))
    elif endpoint == "/v1/responses":
        reply = await _response(gateway, identity, _parsed(ResponseRequest, body), rid, weight_factor)
    else:
        text = _parsed(CompletionRequest, body)
        prepared = await translate.prepare_completion(gateway, text, identity, request_id=rid)
        chunks = translate.named_errors(gateway.stream(_batch_class(prepared, weight_factor)),
                                        translate.constraint_field(text))
        reply = translate.completion(text, prepared, await translate.collect(chunks))
    return 200, reply.model_dump(mode="json", by_alias=True)


async def _response(gateway: Gateway, identity: Any, request: ResponseRequest, rid: str,
                    weight_factor: float) -> ResponseObject:
    """A Responses API line, as the door answers it but never stored: a batch line continues no stored
    response (previous_response_id is refused) and leaves none behind (its output line is the answer)."""
    if request.previous_response_id is not None:
        raise invalid_request("a batch line cannot continue a stored response", param="previous_response_id")
    offered, choice = responses.offered_tools(request)

    async def load_image(url: str) -> bytes:
        return await image_bytes(url, _NO_URLS)

    prepared = await gateway.prepare_chat(request.model, responses.chat(request, [], responses.input_messages(request)),
                                          responses.sampling(request), tools=offered or None, tool_choice=choice,
                                          identity=identity, load_image=load_image, request_id=rid)
    field = "tool_choice" if request.tool_choice not in ("auto", "none") and request.tools else "text.format"
    chunks = translate.named_errors(gateway.stream(_batch_class(prepared, weight_factor)), field)
    got = (await translate.collect(chunks))[0]
    done = responses.reply(got.text, got.finish_reason, responses.tool_names(request))
    return responses.response_object(request, responses.new_id("resp"), output=done.output,
                                     status="incomplete" if done.incomplete else "completed",
                                     usage=responses.usage(prepared.prompt_tokens, got))


def _parsed(model: type[ChatCompletionRequest] | type[CompletionRequest] | type[ResponseRequest],
            body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise invalid_request(f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None


def _batch_class(prepared: Prepared, weight_factor: float) -> Prepared:
    """The request as the tenant's batch class in the engine's fair share (and its prefix cache: the batch class's
    own, unless the tenant shares a group's). The engine's id of the request is this attempt's: an earlier
    attempt, cut off by a crash, may still hold the line's own id in a replica until that replica notices."""
    prepared.request.request_id = f"{prepared.request.request_id}.{uuid.uuid4().hex[:8]}"
    tenant = prepared.request.tenant
    tenant.tenant_id = f"{tenant.tenant_id}:batch"
    tenant.weight = (tenant.weight or 1.0) * weight_factor
    return prepared


__all__ = ["RETRYABLE", "run_line"]
