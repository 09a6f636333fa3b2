"""Bringing tenancy up: the admin credential (never empty or short, never half written), the development
tenant (a local `herd serve` on the embedded SQLite default only), the Redis client's timeouts, and the
modes of the files and directory Herd makes."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from herd.platform.settings import TenancySettings
from herd.platform.tenancy import setup
from herd.platform.tenancy.quota import InProcessQuota, RedisQuota
from herd.platform.tenancy.rate_limit import RedisRateLimiter
from herd.platform.tenancy.setup import DEV_TENANT, MIN_ADMIN_TOKEN_CHARS, admin_token, redis_client, start_tenancy


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0: whatever Herd does not restrict itself comes out world-readable."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the admin credential ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["", "\n", "   \t\n", "short-token\n", "x" * (MIN_ADMIN_TOKEN_CHARS - 1)])
def test_an_empty_blank_or_short_admin_token_refuses_to_start(tmp_path, content):
    path = tmp_path / "admin-token"
    path.write_text(content)
    with pytest.raises(ValueError, match="admin token") as info:
        admin_token(path)
    assert str(path) in str(info.value) and str(MIN_ADMIN_TOKEN_CHARS) in str(info.value)


def test_a_long_enough_admin_token_is_read_stripped(tmp_path):
    path = tmp_path / "admin-token"
    path.write_text("  " + "t" * MIN_ADMIN_TOKEN_CHARS + "\n")
    assert admin_token(path) == "t" * MIN_ADMIN_TOKEN_CHARS


def test_a_missing_admin_token_is_made_owner_only_and_read_back_the_same(tmp_path, permissive_umask):
    path = tmp_path / ".herd" / "admin-token"
    token = admin_token(path)
    assert len(token) >= MIN_ADMIN_TOKEN_CHARS and admin_token(path) == token
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"], "no temporary file left"


def test_a_failed_write_leaves_no_admin_token_file(tmp_path, monkeypatch):
    """A start killed (here: failing) between creating and writing the file must not leave an empty token
    that the next start would take."""
    path = tmp_path / "admin-token"
    fdopen = os.fdopen

    def disk_full(fd: int, *args: object, **kwargs: object) -> object:
        os.close(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", disk_full)
    with pytest.raises(OSError, match="No space"):
        admin_token(path)
    monkeypatch.setattr(os, "fdopen", fdopen)
    assert list(tmp_path.iterdir()) == [], "neither the token file nor a temporary one"
    assert len(admin_token(path)) >= MIN_ADMIN_TOKEN_CHARS


def test_two_starts_racing_for_the_admin_token_end_with_the_same_one(tmp_path, monkeypatch):
    """The second start finds the file made between its check and its own link: it takes the winner's."""
    path = tmp_path / "admin-token"
    link = os.link
    tokens: list[str] = []

    def other_start_first(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        if not tokens:
            monkeypatch.setattr(os, "link", link)
            tokens.append(admin_token(path))  # the other process wins the race
        link(source, target)

    monkeypatch.setattr(os, "link", other_start_first)
    assert admin_token(path) == tokens[0] == path.read_text().strip()
    assert [p.name for p in tmp_path.iterdir()] == ["admin-token"]


# --- the development tenant ----------------------------------------------------------------------------------
def _settings(tmp_path: Path, **fields: object) -> TenancySettings:
    defaults = {"admin_token_file": tmp_path / "admin-token", "spill_path": tmp_path / "spill.jsonl"}
    return TenancySettings(**defaults | fields)  # type: ignore[arg-type]


def _tenants(tenancy: setup.Tenancy) -> list[str]:
    try:
        return [t.id for t in tenancy.store.list_tenants()]
    finally:
        tenancy.store.engine.dispose()


def test_the_development_tenant_only_for_a_local_serve_on_the_embedded_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default URL is relative: .herd/herd.db here
    tenancy = start_tenancy(_settings(tmp_path), dev_tenant=True)
    assert tenancy.first_key is not None and tenancy.first_key.startswith("hk_")
    assert _tenants(tenancy) == [DEV_TENANT]
    again = start_tenancy(_settings(tmp_path), dev_tenant=True)
    assert again.first_key is None and _tenants(again) == [DEV_TENANT], "made once, key shown once"


def test_no_development_tenant_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tenancy = start_tenancy(_settings(tmp_path))
    assert tenancy.first_key is None and _tenants(tenancy) == []


def test_no_development_tenant_on_a_configured_database(tmp_path):
    """A database URL that is not the embedded default is a deployment's: nobody gets a key for everything."""
    tenancy = start_tenancy(_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'shared.db'}"), dev_tenant=True)
    assert tenancy.first_key is None and _tenants(tenancy) == []


def test_a_short_admin_token_stops_tenancy_before_it_starts(tmp_path):
    (tmp_path / "admin-token").write_text("\n")
    with pytest.raises(ValueError, match="admin token"):
        start_tenancy(_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'herd.db'}"))


# --- Redis --------------------------------------------------------------------------------------------------
def test_redis_calls_time_out_on_a_server_that_never_answers():
    """A Redis that accepts and never answers (a hung server, a black-holed connection) must cost a call
    `redis_timeout_s`, not hang it: redis-py's own defaults are 5 s per read and ten retries with backoff."""
    async def main() -> None:
        held: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # open and unanswered

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = redis_client(TenancySettings(redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2))
        try:
            with pytest.raises(redis.exceptions.TimeoutError):
                # The outer bound only turns a hang into a failure; it is far below the defaults' minute.
                await asyncio.wait_for(client.ping(), timeout=4)
        finally:
            await client.aclose()
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_the_redis_client_carries_the_timeouts():
    client = redis_client(TenancySettings(redis_url="redis://127.0.0.1:6379/0", redis_timeout_s=0.7))
    assert isinstance(client, redis.asyncio.Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.7
    assert kwargs["health_check_interval"] > 0
    asyncio.run(client.aclose())


# --- file modes --------------------------------------------------------------------------------------------
def test_the_database_directory_and_files_are_owner_only(tmp_path, monkeypatch, permissive_umask):
    monkeypatch.chdir(tmp_path)
    tenancy = start_tenancy(_settings(tmp_path, admin_token_file=tmp_path / ".herd" / "admin-token"),
                            dev_tenant=True)
    try:
        herd_dir = tmp_path / ".herd"
        assert _mode(herd_dir) == 0o700
        files = sorted(herd_dir.iterdir())
        assert {p.name for p in files} >= {"herd.db", "herd.db-wal", "admin-token"}
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        tenancy.store.engine.dispose()


# --- what the settings reach ---------------------------------------------------------------------------------
def test_the_tenancy_settings_reach_the_guard_the_store_and_the_ledger(tmp_path):
    """With Redis, concurrency slots and the budget are shared (RedisQuota), leased a little past the request
    timeout; the key cache, the database timeout and the output reservation are the settings'."""
    settings = _settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'herd.db'}", redis_url="redis://127.0.0.1:6379/0",
                         key_cache_ttl_s=7.0, key_cache_size=99, database_timeout_s=3.0, redis_timeout_s=0.5,
                         default_output_reservation_tokens=77)
    tenancy = start_tenancy(settings, request_timeout_s=120.0)
    try:
        guard, store = tenancy.guard, tenancy.store
        assert isinstance(guard.limits.quota, RedisQuota) and isinstance(guard.limits.rates, RedisRateLimiter)
        assert guard.limits.quota.lease_s > 120.0 and guard.limits.quota.timeout_s == 0.5
        assert (store.key_cache_ttl_s, store.key_cache_size) == (7.0, 99)
        assert (guard.database_timeout_s, guard.default_output_reservation_tokens) == (3.0, 77)
        assert tenancy.ledger.timeout_s == 3.0
    finally:
        store.engine.dispose()
    local = start_tenancy(_settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'local.db'}"))
    try:
        assert isinstance(local.guard.limits.quota, InProcessQuota)
    finally:
        local.store.engine.dispose()
