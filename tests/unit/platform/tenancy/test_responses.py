"""The stored-responses store on the migrated tenancy database: a tenant's own rows only, until they expire;
a save drops the tenant's expired rows."""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from herd.platform.tenancy.responses import ResponseStore
from herd.platform.tenancy.schema import StoredResponse

CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _save(store, tenant, response_id):
    store.save(tenant, response_id=response_id, model="scout", status="completed", previous_response_id=None,
               body={"id": response_id, "output": []}, conversation=CONVERSATION)


def test_only_the_owner_reads_or_deletes_and_only_until_expiry(engine):
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = ResponseStore(engine, retention_days=1, clock=lambda: now[0])
    _save(store, "a", "resp_1")
    found = store.get("a", "resp_1")
    assert found is not None and found.body["id"] == "resp_1" and found.conversation == CONVERSATION
    assert store.get("b", "resp_1") is None and not store.delete("b", "resp_1")
    assert store.get("a", "resp_2") is None
    now[0] += timedelta(days=1)
    assert store.get("a", "resp_1") is None and not store.delete("a", "resp_1")
    _save(store, "a", "resp_2")  # drops resp_1, expired
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(StoredResponse)) == 1
    assert store.delete("a", "resp_2") and store.get("a", "resp_2") is None


def test_the_in_memory_store_serves_threads_alike():
    store = ResponseStore.in_memory()
    _save(store, "default", "resp_1")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(f is not None for f in pool.map(lambda _: store.get("default", "resp_1"), range(8)))


def test_a_retention_of_nothing_is_refused(engine):
    with pytest.raises(ValueError, match="retention_days"):
        ResponseStore(engine, retention_days=0)
