"""Connecting to the tenancy database and bringing its schema to the head revision.

Every connect and statement is bounded by one timeout (tenancy.database_timeout_s): a database that hangs
costs a request that long, not forever. Migrations run one at a time however many gateways start together:
under a PostgreSQL advisory lock, or a file lock beside a SQLite file.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from herd.platform.settings import TenancySettings
from herd.platform.tenancy.files import open_private, private_file

MIGRATIONS = Path(__file__).with_name("migrations")
DEFAULT_TIMEOUT_S: float = TenancySettings.model_fields["database_timeout_s"].default
MIGRATION_LOCK = 0x4865_7264_4D69_6772  # pg_advisory_xact_lock key of herd's migrations ("HerdMigr")


def connect(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Engine:
    """An engine for a SQLAlchemy URL (sqlite:///path or postgresql+psycopg://...) whose connects and
    statements give up after `timeout_s`. A SQLite file Herd makes is owner-only, as is its directory."""
    database = make_url(url).database
    if url.startswith("sqlite"):
        if database and database != ":memory:" and not database.startswith("file:"):
            private_file(Path(database))  # SQLite gives its -wal and -shm files the database file's mode
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=timeout_s,
                         connect_args=_postgres_arguments(url, timeout_s))


def _postgres_arguments(url: str, timeout_s: float) -> dict[str, object]:
    """libpq parameters: sessions in UTC (the usage ledger's days are UTC days whatever the server's zone);
    each statement cancelled by the server after `timeout_s`; a connect abandoned after it (whole seconds,
    2 at least: libpq's floor); a peer that vanished mid-call (node gone, partition) noticed by TCP within
    about four times it. Parameters the URL sets itself win, its `options` are kept."""
    query = make_url(url).query
    seconds = max(2, math.ceil(timeout_s))
    options = f"-c timezone=UTC -c statement_timeout={math.ceil(timeout_s * 1000)}"
    parameters: dict[str, object] = {
        "options": f"{query['options']} {options}" if "options" in query else options,
        "connect_timeout": seconds, "keepalives": 1, "keepalives_idle": seconds, "keepalives_interval": seconds,
        "keepalives_count": 3, "tcp_user_timeout": seconds * 1000,
    }
    return {k: v for k, v in parameters.items() if k == "options" or k not in query}


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision` (an empty database gets every table). Of several processes
    migrating one database at once, one runs the migrations and the others wait for it, then find the
    schema at `revision` and do nothing."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            _lock_postgres(connection)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _lock_postgres(connection: Connection) -> None:
    """Hold herd's migration lock to the end of this transaction (DDL is transactional on PostgreSQL, so
    the next holder sees the committed schema). Neither the wait nor the migration is bounded by
    statement_timeout: a migration on a large usage table may take longer than any request's statement."""
    connection.execute(text("SET LOCAL statement_timeout = 0"))
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock on `<database>.migrate-lock` for a SQLite file (the pysqlite driver runs DDL
    outside a transaction, so the database cannot lock itself); nothing for other databases."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        yield
        return
    fd = open_private(Path(database + ".migrate-lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
