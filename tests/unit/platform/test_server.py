"""herd serve's doors as uvicorn runs them (limits, slow clients) and what it prints at start."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI

from herd.platform.gateway.door_protocol import DoorProtocol
from herd.platform.server import _announce, door_grace_s, http_config, ledger_reserve_s
from herd.platform.settings import DoorLimits, HerdSettings, TenancySettings
from tests.waiting import until

KEY = "hk_abcd1234_" + "s" * 40


def test_uvicorn_logs_through_herds_handlers_and_redaction():
    """uvicorn's default log config gives uvicorn.error and uvicorn.access handlers of their own that do not
    propagate: their lines would skip Herd's format and redaction. Both doors leave logging to Herd."""
    import logging

    from herd.platform.server import ops_config

    names = ("uvicorn", "uvicorn.error", "uvicorn.access")
    for name in names:
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    http_config(None, HerdSettings(http_port=0))
    ops_config(None, HerdSettings(ops_port=0))
    assert all(not logging.getLogger(n).handlers and logging.getLogger(n).propagate for n in names)


def test_the_door_limits_reach_uvicorn():
    limits = DoorLimits(http_max_connections=7, http_keep_alive_timeout_s=3, http_read_timeout_s=2,
                        http_max_header_bytes=4096)
    config = http_config(None, HerdSettings(http_port=0, limits=limits, shutdown_timeout_s=25))
    assert config.limit_concurrency == 7 and config.timeout_keep_alive == 3
    assert config.h11_max_incomplete_event_size == 4096
    assert issubclass(config.http, DoorProtocol) and config.http.header_timeout_s == 2
    assert config.http.write_timeout_s == DoorLimits().stream_write_timeout_s
    assert config.timeout_graceful_shutdown == door_grace_s(HerdSettings(shutdown_timeout_s=25)) == 20
    assert ledger_reserve_s(25) == 5 and door_grace_s(HerdSettings(shutdown_timeout_s=3)) == 2.4


async def _serving(settings: HerdSettings):
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"ok": "yes"}

    server = uvicorn.Server(http_config(app, settings))
    task = asyncio.create_task(server.serve())
    assert await until(lambda: server.started or task.done(), timeout_s=30)
    return server, task, server.servers[0].sockets[0].getsockname()[1]


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def test_a_client_whose_headers_never_end_is_disconnected_and_one_with_huge_headers_is_400():
    settings = HerdSettings(http_port=0, limits=DoorLimits(http_read_timeout_s=0.3, http_max_header_bytes=4096))

    async def main():
        server, task, port = await _serving(settings)
        loop = asyncio.get_running_loop()
        try:
            slow = _raw(port)
            await loop.sock_sendall(slow, b"GET / HTTP/1.1\r\nHost: herd\r\nX-Slow: a")  # and nothing more
            try:
                closed = await asyncio.wait_for(loop.sock_recv(slow, 1024), 15) == b""
            except TimeoutError:
                closed = False
            big = _raw(port)
            # Headers still coming past the limit (h11 bounds what it buffers while an event is incomplete).
            await loop.sock_sendall(big, b"GET / HTTP/1.1\r\nHost: herd\r\nX-Big: " + b"a" * 8192)
            answer = await asyncio.wait_for(loop.sock_recv(big, 1024), 15)
            fine = _raw(port)
            await loop.sock_sendall(fine, b"GET / HTTP/1.1\r\nHost: herd\r\n\r\n")
            served = await asyncio.wait_for(loop.sock_recv(fine, 1024), 15)
            for sock in (slow, big, fine):
                sock.close()
            return closed, answer, served
        finally:
            server.should_exit = True
            await task

    closed, answer, served = asyncio.run(main())
    assert closed, "a connection whose headers never ended was kept open"
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert served.startswith(b"HTTP/1.1 200"), served


def test_the_banner_prints_no_database_password_and_no_key_except_a_local_first_start_key(capsys):
    configured = HerdSettings(tenancy=TenancySettings(database_url="postgresql+psycopg://herd:s3cret-pw@db:5432/herd"))
    _announce(configured, 8000, 50051, SimpleNamespace(first_key=KEY))  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out and "postgresql+psycopg://herd:" in out and "@db:5432/herd" in out
    assert KEY not in out, "a key made against a configured database must never be printed"
    _announce(HerdSettings(), 8000, 50051, SimpleNamespace(first_key=KEY))  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out.count(KEY) == 1, "the local development key is shown once"
    assert "$HERD_KEY" in out and "/admin/v1" in out and ":9401/" in out


def test_every_banner_line_is_redacted_like_a_log_line(capsys, tmp_path):
    leaky = HerdSettings(tenancy=TenancySettings(admin_token_file=tmp_path / KEY))  # a key where no key belongs
    _announce(leaky, 8000, 50051, SimpleNamespace(first_key=None))  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert KEY not in out and "hk_abcd1234_[redacted]" in out
