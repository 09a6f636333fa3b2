"""What the HTTP door reads from a client, bounded: the body's size (413) and time (408).

A pure ASGI middleware: a declared Content-Length over the limit is refused without reading a byte; a
body without one (chunked) is counted as it arrives and refused at the first byte past the limit. A body
that has not all arrived `read_timeout_s` after the request began is refused with 408. The application
never sees more than the limit, and never waits on a slow client past the deadline.
The headers come before the application exists: herd.platform.gateway.door_protocol bounds their time.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from herd.engine.errors import Code, HerdError
from herd.platform.gateway.anthropic_errors import door_body
from herd.platform.gateway.errors import payload_too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Refused(Exception):
    """Raised into the application when a body passes the limit or the deadline (the refusal is already sent)."""


class BodyLimitMiddleware:
    """Refuses HTTP request bodies larger than `max_body_bytes` with 413, and slower than `read_timeout_s`
    (from the request's start to its last byte) with 408."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, read_timeout_s: float | None = None) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {max_body_bytes}")
        if read_timeout_s is not None and read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _refuse(send, 413, payload_too_large(self.max_body_bytes), scope)
            return
        loop = asyncio.get_running_loop()
        deadline = None if self.read_timeout_s is None else loop.time() + self.read_timeout_s
        received, started, refused, complete = 0, False, False, False

        async def refuse(status: int, err: HerdError) -> _Refused:
            nonlocal refused
            if not started:
                await _refuse(send, status, err, scope)
                refused = True
            return _Refused(err.message)

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete or deadline is None:
                message = await receive()  # the body is in: what follows is a disconnect, never waited on
            else:
                try:
                    message = await asyncio.wait_for(receive(), deadline - loop.time())
                except TimeoutError:
                    raise await refuse(408, body_timeout(self.read_timeout_s or 0)) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise await refuse(413, payload_too_large(self.max_body_bytes))
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the refusal is the answer; whatever the application makes of the error is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise


def body_timeout(seconds: float) -> HerdError:
    return HerdError(Code.DEADLINE_EXCEEDED, f"The request body did not arrive within {seconds:g} s.",
                     reason="request_timeout")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server refuses a malformed length itself
    return None


async def _refuse(send: Send, status: int, err: HerdError, scope: Scope) -> None:
    body = json.dumps(door_body(str(scope.get("path", "")), err)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
