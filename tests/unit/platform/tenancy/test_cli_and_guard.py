"""`herd tenants` against a database, and the guard when the database is down (503, nothing guessed)."""

from __future__ import annotations

import asyncio
import json

import pytest

from herd.cli import main
from herd.engine.errors import HerdError
from herd.platform.gateway.errors import http_status
from herd.platform.tenancy.database import connect
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter
from herd.platform.tenancy.store import TenantStore


def _run(capsys, *args):
    code = main(["tenants", *args])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def test_tenants_cli_against_the_database(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'herd.db'}"
    code, tenant, _ = _run(capsys, "--db", db, "create", "team-x", "--models", "scout,maverick", "--rpm", "10",
                           "--weight", "2")
    assert code == 0 and tenant["allowed_models"] == ["scout", "maverick"] and tenant["requests_per_min"] == 10
    code, key, _ = _run(capsys, "--db", db, "key-create", "team-x", "--name", "ci")
    assert code == 0 and key["key"].startswith("hk_") and key["prefix"] in key["key"]
    code, keys, _ = _run(capsys, "--db", db, "keys", "team-x")
    assert [k["id"] for k in keys] == [key["id"]] and all("key" not in k for k in keys), "never shown again"
    store = TenantStore(connect(db), key_cache_ttl_s=0)  # another process's revoke is seen at once only uncached
    assert store.authenticate(key["key"]).tenant.id == "team-x"
    _run(capsys, "--db", db, "key-revoke", key["id"])
    assert store.authenticate(key["key"]) is None
    code, _, err = _run(capsys, "--db", db, "create", "team-x")
    assert code == 2 and "exists already" in err
    code, _, err = _run(capsys, "--db", db, "delete", "nobody")
    assert code == 2 and "no tenant" in err


def test_a_database_that_is_down_refuses_with_503(tmp_path):
    store = TenantStore(connect("postgresql+psycopg://postgres@127.0.0.1:1/nowhere?connect_timeout=2"))
    guard = Guard(store, InProcessRateLimiter(), UsageLedger(store))
    with pytest.raises(HerdError) as info:
        asyncio.run(guard.authenticate("hk_abcdefgh_" + "x" * 32))
    assert http_status(info.value) == 503 and info.value.code == "UNAVAILABLE" and info.value.retry_after_s
