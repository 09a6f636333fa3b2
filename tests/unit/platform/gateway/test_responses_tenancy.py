"""Stored responses with tenancy on: a tenant reads, continues and deletes only its own (another tenant's id is
404, never 403), a response expires after the retention, and every response is one usage row."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from herd.platform.gateway.backend import LocalBackend
from herd.platform.gateway.core import Gateway
from herd.platform.gateway.http_app import create_app
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.responses import ResponseStore
from herd.platform.tenancy.store import TenantStore


@pytest.fixture
def world(tmp_path, core):
    store = TenantStore(connect(f"sqlite:///{tmp_path / 'herd.db'}"))
    migrate(store.engine)
    ledger = UsageLedger(store, flush_interval_s=0.05)
    gateway = Gateway({"scout": LocalBackend(core, max_ongoing_requests=8, max_queued_requests=8)},
                      guard=Guard(store, InProcessRateLimiter(), ledger))
    now = [datetime(2026, 12, 1, tzinfo=UTC)]
    responses = ResponseStore(store.engine, retention_days=2, clock=lambda: now[0])
    for tenant in ("a", "b"):
        store.create_tenant(tenant, allowed_models=["*"])
    keys = {t: store.issue_key(t)[1] for t in ("a", "b")}
    return store, ledger, create_app(gateway, responses=responses), keys, now


def _clients(app, keys):
    return {t: openai.AsyncOpenAI(api_key=key, base_url="http://herd/v1", http_client=httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://herd/v1")) for t, key in keys.items()}


async def _status(call):
    try:
        await call
    except openai.APIStatusError as err:
        return err.status_code, err.body
    return 200, None


def test_another_tenants_response_is_404_to_read_continue_and_delete(world):
    store, ledger, app, keys, _ = world

    async def main():
        ledger.start()
        clients = _clients(app, keys)
        made = await clients["a"].responses.create(model="scout", input="Secret plans.", max_output_tokens=3)
        theirs = [await _status(clients["b"].responses.retrieve(made.id)),
                  await _status(clients["b"].responses.delete(made.id)),
                  await _status(clients["b"].responses.create(model="scout", input="x", max_output_tokens=2,
                                                              previous_response_id=made.id))]
        mine = await clients["a"].responses.retrieve(made.id)
        follow = await clients["a"].responses.create(model="scout", input="More.", max_output_tokens=2,
                                                     previous_response_id=made.id)
        await ledger.close()
        return made, theirs, mine, follow

    made, theirs, mine, follow = asyncio.run(main())
    assert [status for status, _ in theirs] == [404, 404, 404]
    assert theirs[2][1]["param"] == "previous_response_id"
    assert all("a" not in body["message"].split() for _, body in theirs), "the refusal names no tenant"
    assert mine.id == made.id and follow.previous_response_id == made.id
    rows = store.usage_rows("a")
    assert len(rows) == 2 and not store.usage_rows("b"), "one usage row per response; a refused one has none"
    assert sorted(r.completion_tokens for r in rows) == sorted([made.usage.output_tokens, follow.usage.output_tokens])


def test_a_response_expires_after_the_retention(world):
    _, _, app, keys, now = world

    async def main():
        client = _clients(app, keys)["a"]
        made = await client.responses.create(model="scout", input="Remember this.", max_output_tokens=2)
        now[0] += timedelta(days=2) - timedelta(seconds=1)
        kept = await _status(client.responses.retrieve(made.id))
        now[0] += timedelta(seconds=1)
        expired = [await _status(client.responses.retrieve(made.id)),
                   await _status(client.responses.create(model="scout", input="x", previous_response_id=made.id)),
                   await _status(client.responses.delete(made.id))]
        return kept, expired

    kept, expired = asyncio.run(main())
    assert kept[0] == 200
    assert [status for status, _ in expired] == [404, 404, 404]
