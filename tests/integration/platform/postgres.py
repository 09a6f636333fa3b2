"""Throwaway PostgreSQL databases for integration tests: each is created empty as `herd_test_<hex>` on the
server at ADMIN_URL and dropped (WITH (FORCE), so open connections do not keep it) when the test is done.
Without a server the tests skip, except in CI (CI set), where they fail."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


class Databases:
    """Makes and drops databases on one server through an AUTOCOMMIT connection (CREATE DATABASE needs one)."""

    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        self.admin_url = admin_url
        self.admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        self.made: list[str] = []

    def check(self) -> None:
        """Skips (or fails in CI) when the server is not there."""
        try:
            with self.admin.connect() as connection:
                connection.execute(text("SELECT 1"))
        except OperationalError as err:
            self.admin.dispose()
            first_line = str(err.orig or err).strip().splitlines()[0]
            reason = f"PostgreSQL at {self.admin_url} is unreachable ({first_line})"
            if os.environ.get("CI"):
                pytest.fail(f"{reason}; it is required in CI")
            pytest.skip(f"{reason}; start one to run these tests")

    def create(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = f"herd_test_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        self.made.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def execute(self, sql: str) -> None:
        with self.admin.connect() as connection:
            connection.execute(text(sql))

    def drop(self, url: str) -> None:
        name = make_url(url).database
        if name in self.made:
            self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            self.made.remove(name)

    def close(self) -> None:
        for name in list(self.made):
            self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.made.clear()
        self.admin.dispose()


@contextmanager
def postgres_databases(admin_url: str = ADMIN_URL) -> Iterator[Databases]:
    """The server's database maker, for a module-scoped fixture; every database it made is gone afterwards."""
    databases = Databases(admin_url)
    databases.check()
    try:
        yield databases
    finally:
        databases.close()
