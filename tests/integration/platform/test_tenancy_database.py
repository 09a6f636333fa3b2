"""The tenancy database on a real PostgreSQL, beside SQLite: migrations from empty and from the first
schema (with data in it), and TenantStore round trips that must read the same on both backends.

Every PostgreSQL test gets a fresh `herd_test_<hex>` database, dropped afterwards (tests/integration/
platform/postgres.py). Without a server on 127.0.0.1:5432 these tests skip, except in CI, where they fail."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, event, inspect, text
from sqlalchemy.exc import IntegrityError, OperationalError

from herd.platform.tenancy.database import MIGRATION_LOCK, connect, migrate
from herd.platform.tenancy.keys import new_key
from herd.platform.tenancy.schema import Base
from herd.platform.tenancy.store import TenantStore
from tests.integration.platform.postgres import Databases, postgres_databases

HEAD = "0005"
COLUMNS = {
    "tenants": {"id", "name", "allowed_models", "requests_per_min", "input_tokens_per_min", "output_tokens_per_min",
                "max_concurrent", "max_context", "max_output_tokens", "monthly_token_budget", "weight",
                "priority_class", "sharing_group", "disabled", "created_at", "updated_at"},
    "api_keys": {"id", "tenant_id", "prefix", "key_hash", "name", "created_at", "expires_at", "revoked_at",
                 "last_used_at"},
    "usage": {"id", "time", "tenant_id", "key_id", "model", "request_id", "prompt_tokens", "completion_tokens",
              "cached_tokens", "status", "latency_ms", "adapter"},
    "stored_responses": {"id", "tenant_id", "model", "status", "previous_response_id", "body", "conversation",
                         "created_at", "expires_at"},
    "files": {"id", "tenant_id", "purpose", "filename", "bytes", "storage_key", "created_at", "expires_at"},
    "batches": {"id", "tenant_id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id",
                "error_file_id", "total", "completed", "failed", "metadata", "errors", "created_at", "expires_at",
                "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at",
                "cancelled_at"},
    "batch_items": {"batch_id", "line", "custom_id", "status", "request", "result", "updated_at"},
    "adapters": {"id", "model", "name", "path", "rank", "targets", "created_at"},
    "adapter_grants": {"adapter_id", "tenant_id"},
}
FIRST_TABLES = ("tenants", "api_keys", "usage")
"""The tables of the first schema (0001); later revisions add columns to them and tables beside them."""
ADDED_LATER = {"tenants": {"sharing_group"}, "api_keys": {"last_used_at"}, "usage": {"cached_tokens", "adapter"}}
"""Columns of the first schema's tables that later revisions added (0002; usage.adapter: 0005)."""
T0 = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

Backend = Callable[[], Engine]  # a fresh, empty database of one kind


@pytest.fixture(scope="module")
def databases() -> Iterator[Databases]:
    with postgres_databases() as made:
        yield made


@pytest.fixture
def postgres(databases: Databases) -> Iterator[Backend]:
    """Fresh empty PostgreSQL databases for this test."""
    engines: list[tuple[Engine, str]] = []

    def make() -> Engine:
        url = databases.create()
        engine = connect(url)
        engines.append((engine, url))
        return engine

    yield make
    for engine, url in engines:
        engine.dispose()
        databases.drop(url)


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Backend]:
    engines: list[Engine] = []

    def make() -> Engine:
        engine = connect("sqlite:///" + str(tmp_path / f"tenancy-{len(engines)}.db"))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(request.param)


def revision(engine: Engine) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()


def columns(engine: Engine, tables: Iterable[str] = COLUMNS) -> dict[str, set[str]]:
    inspector = inspect(engine)
    return {table: {c["name"] for c in inspector.get_columns(table)} for table in tables}


def usage_row(request_id: str, *, time: datetime = T0, tenant_id: str = "acme", key_id: str | None = None,
              model: str = "llama", prompt: int = 10, completion: int = 5, cached: int = 0) -> dict[str, Any]:
    return {"time": time, "tenant_id": tenant_id, "key_id": key_id, "model": model, "request_id": request_id,
            "prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached, "status": "ok",
            "latency_ms": 3}


# --- migrations ---------------------------------------------------------------------------------------------------
def test_an_empty_database_migrates_to_head(backend: Backend) -> None:
    engine = backend()
    assert inspect(engine).get_table_names() == []
    migrate(engine)
    assert revision(engine) == HEAD
    assert set(inspect(engine).get_table_names()) == {*COLUMNS, "alembic_version"}
    assert columns(engine) == COLUMNS

    inspector = inspect(engine)
    indexes = {i["name"]: (i["column_names"], bool(i["unique"])) for i in inspector.get_indexes("api_keys")}
    assert indexes["ix_api_keys_prefix"] == (["prefix"], True)
    assert indexes["ix_api_keys_tenant_id"] == (["tenant_id"], False)
    (foreign_key,) = inspector.get_foreign_keys("api_keys")
    assert (foreign_key["referred_table"], foreign_key["constrained_columns"]) == ("tenants", ["tenant_id"])
    assert foreign_key["options"].get("ondelete", "").upper() == "CASCADE"

    migrate(engine)  # at head already: nothing to do, nothing broken
    assert revision(engine) == HEAD


def test_gateways_migrating_at_once_run_the_migrations_once(backend: Backend) -> None:
    """Gateway pods started together all migrate the one database: exactly one runs the migrations, the
    others wait for it and find the schema at head (without the lock: duplicate tables, version errors)."""
    first = backend()
    url = first.url.render_as_string(hide_password=False)
    engines = [first, *(connect(url) for _ in range(3))]
    tables_made: list[str] = []
    for engine in engines:
        @event.listens_for(engine, "before_cursor_execute")
        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if statement.lstrip().upper().startswith("CREATE TABLE TENANTS"):
                tables_made.append(statement)

    together = threading.Barrier(len(engines))

    def start(engine: Engine) -> None:
        together.wait()
        migrate(engine)

    try:
        with ThreadPoolExecutor(len(engines)) as pool:
            for started in [pool.submit(start, engine) for engine in engines]:
                started.result()
        assert revision(first) == HEAD and len(tables_made) == 1
        with first.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        for engine in engines[1:]:
            engine.dispose()


def test_the_migrations_build_what_the_orm_describes(backend: Backend) -> None:
    engine = backend()
    migrate(engine)
    with engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert drift == []  # schema.py changed without a migration, or the other way round


def test_the_database_enforces_unique_request_ids_and_cascades_key_deletion(backend: Backend) -> None:
    engine = backend()
    migrate(engine)
    store = TenantStore(engine)
    store.create_tenant("acme")
    store.issue_key("acme")
    store.record_usage([usage_row("r1")])
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM tenants WHERE id = 'acme'"))  # below the ORM: the FK must cascade
        assert connection.execute(text("SELECT count(*) FROM api_keys")).scalar_one() == 0
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO usage (time, tenant_id, model, request_id, status) VALUES (:t, 'x', 'm', 'r1', 'ok')"),
            {"t": T0})


def old_rows(engine: Engine) -> str:
    """Rows written by a server on the first schema, with its columns only; returns that key's plaintext."""
    made = new_key()
    sqlite = engine.dialect.name == "sqlite"
    moment = "2025-03-14 12:00:00.000000" if sqlite else "2025-03-14 12:00:00+00"
    expiry = "2030-01-01 00:00:00.000000" if sqlite else "2030-01-01 00:00:00+00"
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO tenants (id, name, allowed_models, requests_per_min, monthly_token_budget, weight,"
            " priority_class, disabled) VALUES ('old', 'Old Co', :models, 60, 5000000000, 1.5, 'gold', :off)"),
            {"models": '["llama", "qwen"]', "off": False})
        connection.execute(text(
            "INSERT INTO api_keys (id, tenant_id, prefix, key_hash, name, expires_at)"
            " VALUES ('key1', 'old', :prefix, :hash, 'legacy', :expiry)"),
            {"prefix": made.prefix, "hash": made.key_hash, "expiry": expiry})
        connection.execute(text(
            "INSERT INTO usage (time, tenant_id, key_id, model, request_id, prompt_tokens, completion_tokens,"
            " status, latency_ms) VALUES (:time, 'old', 'key1', 'llama', 'old-req', 100, 50, 'ok', 12)"),
            {"time": moment})
    return made.plaintext


def test_a_database_on_the_first_schema_upgrades_with_its_rows_intact(backend: Backend) -> None:
    engine = backend()
    migrate(engine, "0001")
    assert revision(engine) == "0001"
    at_0001 = columns(engine, FIRST_TABLES)
    for table, added in ADDED_LATER.items():
        assert at_0001[table] == COLUMNS[table] - added
    plaintext = old_rows(engine)

    migrate(engine)
    assert revision(engine) == HEAD
    assert columns(engine) == COLUMNS
    with engine.connect() as connection:
        tenant = connection.execute(text("SELECT * FROM tenants")).mappings().one()
        key = connection.execute(text("SELECT * FROM api_keys")).mappings().one()
        usage = connection.execute(text("SELECT * FROM usage")).mappings().one()
    assert (tenant["id"], tenant["name"], tenant["requests_per_min"], tenant["monthly_token_budget"]) == (
        "old", "Old Co", 60, 5_000_000_000)
    assert (tenant["weight"], tenant["priority_class"], bool(tenant["disabled"])) == (1.5, "gold", False)
    assert tenant["created_at"] is not None
    assert tenant["sharing_group"] is None
    assert (key["tenant_id"], key["name"], key["revoked_at"], key["last_used_at"]) == ("old", "legacy", None, None)
    assert (usage["request_id"], usage["prompt_tokens"], usage["completion_tokens"], usage["latency_ms"]) == (
        "old-req", 100, 50, 12)
    assert usage["cached_tokens"] == 0

    # ...and the store reads and uses them as if they had been written at head.
    store = TenantStore(engine)
    old = store.get_tenant("old")
    assert (old.allowed_models, old.weight, old.sharing_group) == (["llama", "qwen"], 1.5, None)
    identity = store.authenticate(plaintext, now=T0)
    assert identity is not None and (identity.tenant.id, identity.key_id) == ("old", "key1")
    assert store.authenticate(plaintext, now=datetime(2030, 1, 1, tzinfo=UTC)) is None  # the old expiry holds
    (listed,) = store.list_keys("old")
    assert listed.last_used_at is not None
    store.record_usage([usage_row("new-req", tenant_id="old", key_id="key1", cached=7)])
    assert store.usage(tenant_id="old") == [
        {"tenant_id": "old", "key_id": "key1", "model": "llama", "adapter": None, "day": "2025-03-14", "requests": 2,
         "prompt_tokens": 110, "completion_tokens": 55, "cached_tokens": 7}]


# --- the store on both backends -----------------------------------------------------------------------------------
def round_trip(store: TenantStore) -> None:
    store.create_tenant("acme", allowed_models=["llama"], sharing_group="g1")
    store.create_tenant("beta")
    key, plaintext = store.issue_key("acme", name="ci", expires_at=T0 + timedelta(days=1))
    assert plaintext.startswith(f"hk_{key.prefix}_")

    identity = store.authenticate(plaintext, now=T0)
    assert identity is not None
    assert (identity.tenant.id, identity.tenant.sharing_group, identity.key_id) == ("acme", "g1", key.id)
    (stored,) = store.list_keys("acme")
    assert stored.last_used_at is not None
    assert stored.last_used_at.replace(tzinfo=stored.last_used_at.tzinfo or UTC) == T0
    assert store.authenticate(plaintext, now=T0 + timedelta(days=1)) is None  # expired
    assert store.authenticate(plaintext[:-1] + ("x" if plaintext[-1] != "x" else "y"), now=T0) is None

    late = T0.replace(hour=23, minute=59, second=59)
    rows = [usage_row("r1", key_id=key.id, prompt=10, completion=1, cached=4),
            usage_row("r2", time=late, key_id=key.id, prompt=20, completion=2),
            usage_row("r3", time=T0 + timedelta(days=1), key_id=key.id, prompt=40, completion=4),
            usage_row("b1", tenant_id="beta", prompt=1000, completion=100)]
    store.record_usage(rows)
    store.record_usage(rows[:2])  # a retry
    assert [r.request_id for r in store.usage_rows("acme")] == ["r1", "r2", "r3"]

    by_day = store.usage(tenant_id="acme")
    for row in by_day:
        assert isinstance(row["day"], str) and DAY.fullmatch(row["day"]), row["day"]
    assert [(r["day"], r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])
            for r in by_day] == [("2025-03-14", 2, 30, 3, 4), ("2025-03-15", 1, 40, 4, 0)]
    assert {r["tenant_id"] for r in by_day} == {"acme"}
    assert store.tokens_used_since("acme", T0) == 33 + 44
    assert store.tokens_used_since("acme", late + timedelta(seconds=1)) == 44

    new, new_text = store.rotate_key(key.id)
    identity = store.authenticate(new_text, now=T0)
    assert identity is not None and identity.key_id == new.id != key.id
    store.delete_tenant("acme")
    assert store.list_keys("acme") == []
    assert store.authenticate(new_text, now=T0) is None


def test_the_store_round_trips(backend: Backend) -> None:
    engine = backend()
    migrate(engine)
    round_trip(TenantStore(engine))


def test_usage_filters_by_day(backend: Backend) -> None:
    """`usage(day="YYYY-MM-DD")`, as GET /admin/v1/usage?day=... asks it."""
    engine = backend()
    migrate(engine)
    store = TenantStore(engine)
    store.record_usage([usage_row("r1"), usage_row("r2", time=T0 + timedelta(days=1), prompt=40)])
    assert [(r["day"], r["prompt_tokens"]) for r in store.usage(day="2025-03-15")] == [("2025-03-15", 40)]
    assert [(r["day"], r["prompt_tokens"]) for r in store.usage(tenant_id="acme", day="2025-03-14")] == [
        ("2025-03-14", 10)]
    assert store.usage(day="2025-03-16") == []


def test_usage_days_are_utc_days_whatever_the_servers_timezone(
        databases: Databases, postgres: Backend, sqlite: Backend) -> None:
    """The same rows must give the same per-day usage on PostgreSQL as on SQLite (which stores UTC), also on
    a PostgreSQL server whose TimeZone is not UTC."""
    rows = [usage_row("late", time=datetime(2025, 3, 15, 2, 30, tzinfo=UTC)),  # 22:30 on the 14th in New York
            usage_row("noon", time=datetime(2025, 3, 15, 12, 0, tzinfo=UTC), prompt=40)]
    reports = {}
    for name, make in (("sqlite", sqlite), ("postgresql", postgres)):
        engine = make()
        if name == "postgresql":
            database = engine.url.database
            databases.execute(f"ALTER DATABASE \"{database}\" SET timezone TO 'America/New_York'")
            engine.dispose()  # connections opened from here on get the database's setting
        migrate(engine)
        store = TenantStore(engine)
        store.record_usage(rows)
        assert store.tokens_used_since("acme", datetime(2025, 3, 15, tzinfo=UTC)) == 15 + 45
        reports[name] = [(r["day"], r["requests"], r["prompt_tokens"]) for r in store.usage()]
    assert reports["sqlite"] == [("2025-03-15", 2, 50)]
    assert reports["postgresql"] == reports["sqlite"]


# --- timeouts -----------------------------------------------------------------------------------------------
def test_a_statement_past_the_timeout_is_cancelled(databases: Databases) -> None:
    """A database that stops answering (here: a statement that sleeps) costs a call database_timeout_s."""
    url = databases.create()
    engine = connect(url, timeout_s=0.5)
    try:
        with pytest.raises(OperationalError, match="statement timeout"), engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(30)"))
        with engine.connect() as connection:  # the session stays usable
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
        databases.drop(url)


def test_a_migration_waits_for_another_past_the_statement_timeout(databases: Databases) -> None:
    """Waiting for another gateway's migration (and the migration itself) is not cut at the request path's
    statement timeout: the waiting gateway migrates once the other is done."""
    url = databases.create()
    holder, waiter = connect(url), connect(url, timeout_s=0.5)
    try:
        with holder.connect() as held, ThreadPoolExecutor(1) as pool:
            held.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            waiting = pool.submit(migrate, waiter)
            while not _waited_on_the_lock_for_1_s(held):
                assert not waiting.done(), waiting.exception()
            held.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
            waiting.result()
        assert revision(waiter) == HEAD
    finally:
        holder.dispose()
        waiter.dispose()
        databases.drop(url)


def _waited_on_the_lock_for_1_s(connection: Connection) -> bool:
    """Whether a session of this database has waited on an advisory lock for a second (twice the timeout).
    Asked in a transaction of its own (pg_stat_activity is a snapshot per transaction), a little later each
    time; the session's advisory lock outlives the commit."""
    waited = connection.execute(text(
        "SELECT count(*) FROM pg_stat_activity JOIN pg_locks USING (pid), pg_sleep(0.05) "
        "WHERE datname = current_database() AND locktype = 'advisory' AND NOT granted "
        "AND clock_timestamp() - query_start > interval '1 second'")).scalar_one()
    connection.commit()
    return bool(waited)
