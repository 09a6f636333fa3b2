"""Every way a request can be refused, built here and only here, and how each door presents it.

Refusals are HerdErrors (herd.engine.errors: a gRPC code, a message, the bad parameter, a reason, a retry
delay), the one error type from the engine to the gateway. The gRPC door answers with the code; the HTTP
door with `http_status` and `openai_body`. A replica's errors arrive as HerdErrors too (`from_replica`).

A failure on our side is answered without its detail: exception text, Ray's, a shard's address stay in the
log, under the request id, and the caller gets that id to quote (`internal`, `replica_unavailable`, and
`from_replica` for a replica's INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED). A refusal of the request itself
(4xx) keeps its message: it tells the caller what to change.
"""

from __future__ import annotations

import logging
import uuid

from herd.engine.errors import Code, HerdError
from herd.platform.telemetry import logs

log = logging.getLogger(__name__)

_HTTP = {  # code -> (HTTP status, OpenAI error type)
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.NOT_FOUND: (404, "invalid_request_error"),
    Code.ALREADY_EXISTS: (409, "invalid_request_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.CANCELLED: (499, "cancelled"),
    Code.INTERNAL: (500, "server_error"),
    Code.UNAVAILABLE: (503, "server_error"),
    Code.DEADLINE_EXCEEDED: (504, "timeout"),
}
_HTTP_BY_REASON = {"request_too_large": (413, "invalid_request_error")}  # RESOURCE_EXHAUSTED, but not a limit
_HTTP_CODES = {404: Code.NOT_FOUND, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED}


def http_status(err: HerdError) -> int:
    return _HTTP_BY_REASON.get(err.reason or "", _HTTP[err.code])[0]


def openai_body(err: HerdError) -> dict[str, object]:
    """The OpenAI-shaped error body."""
    kind = _HTTP_BY_REASON.get(err.reason or "", _HTTP[err.code])[1]
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.reason}}


def bearer_credential(header: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header; None when absent, another scheme, or
    not printable ASCII (no key or token Herd issues is: such a value is no credential, a 401, and never
    reaches a comparison that would fail on it)."""
    scheme, _, credential = (header or "").strip().partition(" ")
    return _printable(credential.strip()) if scheme.lower() == "bearer" else None


def header_credential(authorization: str | None, x_api_key: str | None) -> str | None:
    """The credential of an HTTP request: `Authorization: Bearer <credential>`, else `x-api-key: <credential>`
    (Anthropic's clients send that); None as bearer_credential says."""
    if authorization is not None:
        return bearer_credential(authorization)
    return _printable((x_api_key or "").strip())


def metadata_credential(value: str | None) -> str | None:
    """The credential of gRPC `authorization` metadata: "Bearer <credential>" or the bare credential; None as
    bearer_credential says."""
    value = (value or "").strip()
    return bearer_credential(value) if value.lower().startswith("bearer ") else _printable(value)


def _printable(credential: str) -> str | None:
    return credential if credential and credential.isascii() and credential.isprintable() else None


# --- the request --------------------------------------------------------------------------------------------
def invalid_request(message: str, param: str | None = None) -> HerdError:
    return HerdError(Code.INVALID_ARGUMENT, message, param=param)


def http_refusal(status: int, message: str) -> HerdError:
    """A refusal of the HTTP framework's own (no such route, wrong method, an unreadable body)."""
    return HerdError(_HTTP_CODES.get(status, Code.INTERNAL if status >= 500 else Code.INVALID_ARGUMENT), message)


def too_many_images(count: int, limit: int) -> HerdError:
    return invalid_request(f"{count} images in one request; at most {limit} are allowed", param="messages")


def model_not_found(name: str, known: list[str]) -> HerdError:
    return HerdError(Code.NOT_FOUND, f"The model '{name}' does not exist; this server serves {known}",
                     param="model", reason="model_not_found")


def context_length_exceeded(limit: int, prompt: int, completion: int) -> HerdError:
    return HerdError(
        Code.INVALID_ARGUMENT,
        f"This model's maximum context length is {limit} tokens. However, you requested {prompt + completion} "
        f"tokens ({prompt} in the prompt, {completion} in the completion).",
        param="messages", reason="context_length_exceeded",
    )


def payload_too_large(limit_bytes: int) -> HerdError:
    return HerdError(Code.RESOURCE_EXHAUSTED, f"The request body is larger than this server's limit of "
                     f"{limit_bytes} bytes.", reason="request_too_large")


# --- tenancy ------------------------------------------------------------------------------------------------
def unauthenticated(message: str = "Missing or invalid API key.") -> HerdError:
    return HerdError(Code.UNAUTHENTICATED, message, reason="invalid_api_key")


def admin_unauthenticated() -> HerdError:
    return HerdError(Code.UNAUTHENTICATED, "Admin credential required.")


def permission_denied(model: str) -> HerdError:
    return HerdError(Code.PERMISSION_DENIED, f"This API key may not use the model '{model}'.", param="model",
                     reason="model_not_allowed")


def context_limit(limit: int, needed: int) -> HerdError:
    return HerdError(Code.INVALID_ARGUMENT, f"Your context limit is {limit} tokens; this request needs {needed}.",
                     param="max_tokens", reason="context_length_exceeded")


def output_limit(limit: int) -> HerdError:
    return invalid_request(f"max_tokens may be at most {limit} for your key.", param="max_tokens")


def limit_exceeded(limit: str, retry_after_s: float, detail: str) -> HerdError:
    retry = 3600 if retry_after_s == float("inf") else max(1, int(retry_after_s + 0.999))
    return HerdError(Code.RESOURCE_EXHAUSTED, f"Limit '{limit}' reached: {detail}", reason=limit,
                     retry_after_s=retry)


def database_unavailable() -> HerdError:
    return HerdError(Code.UNAVAILABLE, "The tenancy database is unavailable; retry shortly.", retry_after_s=5)


def not_found(message: str) -> HerdError:
    return HerdError(Code.NOT_FOUND, message)


def already_exists(message: str) -> HerdError:
    return HerdError(Code.ALREADY_EXISTS, message)


def file_too_large(size: int, limit_bytes: int) -> HerdError:
    """A Files API upload over the tenant's file limit (413, as a body over the door's limit)."""
    return HerdError(Code.RESOURCE_EXHAUSTED, f"The file is {size} bytes, over this server's limit of {limit_bytes} "
                     "bytes per file.", param="file", reason="request_too_large")


# --- capacity and time --------------------------------------------------------------------------------------
def overloaded(retry_after_s: int = 1) -> HerdError:
    return HerdError(Code.RESOURCE_EXHAUSTED, "The server is at capacity; retry shortly.",
                     retry_after_s=retry_after_s)


def cold_start(model: str, waited_s: float, retry_after_s: int) -> HerdError:
    return HerdError(Code.UNAVAILABLE, f"The model '{model}' has no ready replica yet (it was scaled to zero and one "
                     f"is starting); waited {waited_s:.0f} s. Retry after {retry_after_s} s.",
                     reason="model_starting", retry_after_s=retry_after_s)


def deadline_exceeded(seconds: float) -> HerdError:
    return HerdError(Code.DEADLINE_EXCEEDED, f"The request did not finish within {seconds:g} s.")


def slow_reader(write_timeout_s: float) -> HerdError:
    """A stream whose client took none of its next chunk within the write deadline (it is aborted)."""
    return HerdError(Code.DEADLINE_EXCEEDED, f"The client read nothing of the stream for {write_timeout_s:g} s; "
                     "the request was aborted.", reason="slow_reader")


# --- failures on our side: the detail is logged, the caller gets the request id -----------------------------
_HIDDEN = {  # code -> what the caller is told instead of the detail
    Code.INTERNAL: "internal error",
    Code.UNAVAILABLE: "the model is unavailable; retry shortly",
    Code.DEADLINE_EXCEEDED: "the model did not answer in time",
}


REPLICA_LOST = "replica_lost"
"""The reason of an UNAVAILABLE whose replica died or could not be reached: the gateway may send the request again
(herd.platform.gateway.continuation); a replica's own UNAVAILABLE (shutting down, a shard down) has none."""


def _hidden(code: Code, detail: str, request_id: str | None, retry_after_s: int | None = None,
            reason: str | None = None) -> HerdError:
    """`detail` logged under the request id (the one given, the current request's, else a new one), and an
    error that tells the caller only what kind of failure it was and that id. A bug is an error in the log;
    a replica out of reach or late, a warning (replicas come and go)."""
    request_id = request_id or logs.request_id.get() or f"herd-{uuid.uuid4().hex}"
    level = logging.ERROR if code is Code.INTERNAL else logging.WARNING
    log.log(level, "%s: %s", code.value, detail, extra={"request_id": request_id})
    return HerdError(code, f"{_HIDDEN[code]}; request id {request_id}", retry_after_s=retry_after_s, reason=reason)


def internal(detail: str, *, request_id: str | None = None) -> HerdError:
    """A failure of ours (a bug): `detail` is logged, not answered."""
    return _hidden(Code.INTERNAL, detail, request_id)


def replica_unavailable(detail: str, *, request_id: str | None = None) -> HerdError:
    """No replica could be reached (Ray, the network, a replica going away): worth a retry in a second, which the
    gateway makes itself (reason REPLICA_LOST). `detail` is logged, not answered."""
    return _hidden(Code.UNAVAILABLE, detail, request_id, retry_after_s=1, reason=REPLICA_LOST)


def from_replica(err: HerdError, *, request_id: str | None = None) -> HerdError:
    """A replica's error as the gateway answers it: a replica at capacity is the server at capacity; a failure
    of the replica's own (INTERNAL, UNAVAILABLE: worth a retry in a second, DEADLINE_EXCEEDED) is logged and
    answered without its text (it names shards, hosts, Ray); a refusal of the request as the replica said.
    Always a plain HerdError (what Ray raises is its own subclass, whose text is a remote traceback)."""
    if err.code is Code.RESOURCE_EXHAUSTED:
        return overloaded()
    if err.code in _HIDDEN:
        retry = (err.retry_after_s or 1) if err.code is Code.UNAVAILABLE else err.retry_after_s
        return _hidden(err.code, f"from the replica: {err.message}", request_id, retry)
    return HerdError(err.code, err.message, param=err.param, reason=err.reason, retry_after_s=err.retry_after_s)


def from_status(name: str, message: str, *, request_id: str | None = None) -> HerdError:
    """The error of a gRPC status a replica answered with through Serve's gRPC proxy (its name, its details)."""
    return from_replica(HerdError(Code.of(name), message), request_id=request_id)


__all__ = ["HerdError", "http_status", "openai_body"]
