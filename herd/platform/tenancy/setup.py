"""Bringing tenancy up for `herd serve`: database migrated, limiter, ledger, admin credential, and for a
local `herd serve` on the embedded database a development tenant whose key is printed once."""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from herd.platform.settings import TenancySettings
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.files import private_directory
from herd.platform.tenancy.guard import Guard
from herd.platform.tenancy.keys import redact
from herd.platform.tenancy.ledger import UsageLedger
from herd.platform.tenancy.quota import InProcessQuota, Quota, RedisQuota
from herd.platform.tenancy.rate_limit import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from herd.platform.tenancy.store import TenantStore

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger("herd.tenancy")
DEV_TENANT = "dev"
MIN_ADMIN_TOKEN_CHARS = 32
SLOT_LEASE_MARGIN_S = 60  # a concurrency slot outlives the request timeout by this (then a dead gateway's expires)
REDIS_HEALTH_CHECK_S = 30  # a pooled connection idle this long is pinged before its next command
EMBEDDED_DATABASE_URL: str = TenancySettings.model_fields["database_url"].default


@dataclass
class Tenancy:
    store: TenantStore
    guard: Guard
    ledger: UsageLedger
    admin_token: str
    first_key: str | None  # the development key, only on the start that created it


def start_tenancy(settings: TenancySettings, *, dev_tenant: bool = False, request_timeout_s: float = 600.0) -> Tenancy:
    """Connect, migrate, and read (or make) the admin credential. With `dev_tenant` (a local `herd serve`)
    on the embedded SQLite default, an empty database also gets tenant `dev`: every model, no limits, and
    its key in `first_key`. Never on a configured database: that one is a deployment's. With Redis, rate
    limits, concurrency slots and the monthly budget are shared by every gateway; a slot's lease outlives
    the longest request (`request_timeout_s`) a little, so a dead gateway's slots come back."""
    token = admin_token(settings.admin_token_file)
    engine = connect(settings.database_url, timeout_s=settings.database_timeout_s)
    migrate(engine)
    store = TenantStore(engine, key_cache_ttl_s=settings.key_cache_ttl_s, key_cache_size=settings.key_cache_size)
    limiter: RateLimiter
    quota: Quota
    if settings.redis_url:
        client = redis_client(settings)
        limiter = RedisRateLimiter(client, timeout_s=settings.redis_timeout_s)
        quota = RedisQuota(client, lease_s=request_timeout_s + SLOT_LEASE_MARGIN_S, timeout_s=settings.redis_timeout_s)
    else:
        limiter, quota = InProcessRateLimiter(), InProcessQuota()
    ledger = UsageLedger(store, flush_interval_s=settings.usage_flush_interval_s, spill_path=settings.spill_path,
                         timeout_s=settings.database_timeout_s)
    guard = Guard(store, limiter, ledger, quota=quota, database_timeout_s=settings.database_timeout_s,
                  default_output_reservation_tokens=settings.default_output_reservation_tokens)
    first_key = None
    if dev_tenant and settings.database_url == EMBEDDED_DATABASE_URL and not store.list_tenants():
        store.create_tenant(DEV_TENANT, name="development", allowed_models=["*"])
        _, first_key = store.issue_key(DEV_TENANT, name="first start")
        log.info("created tenant %r with key %s", DEV_TENANT, redact(first_key))
    return Tenancy(store=store, guard=guard, ledger=ledger, admin_token=token, first_key=first_key)


def redis_client(settings: TenancySettings) -> redis.asyncio.Redis:
    """The shared limiter's client: every connect and command bounded by `redis_timeout_s`. A timeout is
    not retried (redis-py's default retries ten times with backoff: a hung Redis would hold a request for
    a minute); a dropped connection is, once, at once (a pooled connection that a Redis restart closed)."""
    import redis.asyncio
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    if settings.redis_url is None:
        raise ValueError("tenancy.redis_url is not set")
    timeout_s = settings.redis_timeout_s
    return redis.asyncio.Redis.from_url(
        settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
        health_check_interval=REDIS_HEALTH_CHECK_S, retry=Retry(NoBackoff(), 1, (RedisConnectionError,)))


def admin_token(path: Path) -> str:
    """The admin credential in `path`, made (owner-only) when absent. Refuses (ValueError) a token shorter
    than MIN_ADMIN_TOKEN_CHARS: an empty Secret or a hand-written word must not guard the admin API."""
    if not path.exists():
        _make_admin_token(path)
    token = path.read_text().strip()
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ValueError(
            f"admin token file {path}: the token has {len(token)} characters, at least {MIN_ADMIN_TOKEN_CHARS} are "
            "required (an empty or short admin token would guard nothing); put a long random one there "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), or delete the file to have one made")
    return token


def _make_admin_token(path: Path) -> None:
    """Write a new token beside `path` and link it into place: `path` is never seen empty or half written,
    whatever kills this process, and of two starts racing the first link wins and both read its token."""
    private_directory(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            log.info("admin token file %s was made by another start meanwhile; using its token", path)
    finally:
        temporary.unlink(missing_ok=True)
