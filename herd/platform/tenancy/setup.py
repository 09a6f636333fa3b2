"""Bringing tenancy up for `herd serve`: database migrated, limiter, ledger, admin credential, and on a
first start a development tenant whose key is printed once."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from herd.platform.settings import TenancySettings
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.keys import redact
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.rate_limit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from herd.platform.tenancy.store import TenantStore

log = logging.getLogger("herd.tenancy")
DEV_TENANT = "dev"


@dataclass
class Tenancy:
    store: TenantStore
    guard: Guard
    ledger: UsageLedger
    admin_token: str
    first_key: str | None  # the development key, only on the start that created it


def start_tenancy(settings: TenancySettings) -> Tenancy:
    """Connect, migrate, and make the admin credential and (first start) the development tenant."""
    engine = connect(settings.database_url)
    migrate(engine)
    store = TenantStore(engine)
    limiter: RateLimiter
    if settings.redis_url:
        import redis.asyncio as aioredis

        limiter = RedisRateLimiter(aioredis.from_url(settings.redis_url))
    else:
        limiter = InProcessRateLimiter()
    ledger = UsageLedger(store, flush_interval_s=settings.usage_flush_interval_s, spill_path=settings.spill_path)
    guard = Guard(store, limiter, ledger)
    first_key = None
    if not store.list_tenants():
        store.create_tenant(DEV_TENANT, name="development", allowed_models=["*"])
        _, first_key = store.issue_key(DEV_TENANT, name="first start")
        log.info("created tenant %r with key %s", DEV_TENANT, redact(first_key))
    return Tenancy(store=store, guard=guard, ledger=ledger, admin_token=admin_token(settings.admin_token_file),
                   first_key=first_key)


def admin_token(path: Path) -> str:
    """The admin credential in `path`, made (owner-only) when absent."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token
