"""One batch runner per PostgreSQL database: the advisory lock is held by one gateway's runner at a time, and
passes to another when its holder's connection goes."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from herd.platform.batch.runner_lock import LOCK_KEY, RunnerLock
from herd.platform.tenancy.database import connect
from tests.integration.platform.postgres import postgres_databases
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def database_url():
    with postgres_databases() as databases:
        yield databases.create()


def test_one_runner_holds_the_lock_and_it_passes_on_when_its_holder_goes(database_url):
    first, second = RunnerLock(connect(database_url)), RunnerLock(connect(database_url))
    try:
        assert first.held() and first.held(), "taken, then kept"
        assert not second.held(), "another gateway's runner waits"
        first.release()
        assert second.held()
        assert not first.held()
        with second.engine.connect() as connection:  # the holder's connection killed, as a dead gateway's would be
            connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                                    "AND objid = :low"), {"low": LOCK_KEY & 0xFFFFFFFF})
            connection.commit()
        # pg_terminate_backend signals the backend and returns: its locks go when it has exited, a moment later.
        assert wait_until(first.held, timeout_s=10.0), "the lock came free with its holder's connection"
        assert not second.held(), "the old holder notices it lost the lock"
    finally:
        first.release()
        second.release()
        first.engine.dispose()
        second.engine.dispose()


def test_sqlite_always_holds_it(tmp_path):
    assert RunnerLock(connect(f"sqlite:///{tmp_path / 'herd.db'}")).held()
