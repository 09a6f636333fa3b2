"""How a refusal reads on the Anthropic door (/v1/messages): `{"type": "error", "error": {"type", "message"}}`
with Anthropic's status for it. Every other route keeps OpenAI's shape (herd.platform.gateway.errors).

The server at capacity (a replica's queue full) and a server unavailable for a moment are Anthropic's 529
overloaded_error; a tenant's own limit is 429 rate_limit_error. Both carry Retry-After where the refusal has one.
"""

from __future__ import annotations

from herd.engine.errors import Code, HerdError
from herd.platform.gateway.errors import http_status, openai_body

MESSAGES_PATH = "/v1/messages"

_ANTHROPIC = {  # code -> (HTTP status, Anthropic error type)
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.PERMISSION_DENIED: (403, "permission_error"),
    Code.NOT_FOUND: (404, "not_found_error"),
    Code.ALREADY_EXISTS: (409, "conflict_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.CANCELLED: (499, "api_error"),
    Code.INTERNAL: (500, "api_error"),
    Code.UNAVAILABLE: (529, "overloaded_error"),
    Code.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_BY_REASON = {
    "request_too_large": (413, "invalid_request_error"),
    "request_timeout": (408, "timeout_error"),
}


def anthropic_door(path: str) -> bool:
    """Whether a request path is the Anthropic door's (its refusals are Anthropic-shaped)."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def _status_and_type(err: HerdError) -> tuple[int, str]:
    if err.reason in _BY_REASON:
        return _BY_REASON[err.reason or ""]
    if err.code is Code.RESOURCE_EXHAUSTED and err.reason is None:
        return 529, "overloaded_error"  # the server at capacity, not the tenant's limit
    return _ANTHROPIC[err.code]


def anthropic_status(err: HerdError) -> int:
    return _status_and_type(err)[0]


def anthropic_body(err: HerdError) -> dict[str, object]:
    return {"type": "error", "error": {"type": _status_and_type(err)[1], "message": err.message}}


def door_status(path: str, err: HerdError) -> int:
    """The HTTP status of a refusal on `path`'s door."""
    return anthropic_status(err) if anthropic_door(path) else http_status(err)


def door_body(path: str, err: HerdError) -> dict[str, object]:
    """The error body of a refusal in `path`'s door's shape."""
    return anthropic_body(err) if anthropic_door(path) else openai_body(err)
