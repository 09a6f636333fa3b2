"""A migrated SQLite tenancy database in the test's own directory, and the store over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = connect("sqlite:///" + str(tmp_path / "tenancy.db"))
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> TenantStore:
    return TenantStore(engine)
