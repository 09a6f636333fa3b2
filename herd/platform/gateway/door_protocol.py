"""The HTTP door's connections, bounded before the application exists (uvicorn's h11 protocol, subclassed).

A connection whose request line and headers have not all arrived within the deadline of its start (or of the
end of its previous response) is closed, so a client that trickles a byte at a time (slowloris) cannot hold
one. TCP_USER_TIMEOUT is set on each connection (Linux): a peer that acknowledges nothing for the write
deadline, a client that stopped reading included (zero-window probes count), is dropped by the kernel, so the
socket of a stream aborted for a stalled reader does not linger with its unsent bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DoorProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not all in within
    `header_timeout_s` of the connection's start, or of the end of its previous response (uvicorn bounds only
    the idle time before a request's first byte; a byte now and then kept a connection forever), and
    dropping one whose peer acknowledges nothing for `write_timeout_s` (None: the system's default)."""

    header_timeout_s: float = 30.0
    write_timeout_s: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._header_deadline: asyncio.TimerHandle | None = None
        self._await_headers()
        sock = transport.get_extra_info("socket")
        user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
        if self.write_timeout_s is not None and sock is not None and user_timeout is not None:
            with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to bound
                sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(self.write_timeout_s * 1000))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a request line and headers are in
            self._cancel_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()

    @classmethod
    def with_limits(cls, *, header_timeout_s: float, write_timeout_s: float | None) -> type[DoorProtocol]:
        """This protocol with these limits (uvicorn takes a class, and makes one per connection)."""
        if header_timeout_s <= 0:
            raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
        if write_timeout_s is not None and write_timeout_s <= 0:
            raise ValueError(f"write_timeout_s must be > 0, got {write_timeout_s}")
        return type(cls.__name__, (cls,), {"header_timeout_s": header_timeout_s, "write_timeout_s": write_timeout_s})


__all__ = ["DoorProtocol"]
