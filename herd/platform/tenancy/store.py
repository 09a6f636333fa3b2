"""The tenancy database's operations: tenants, keys, authentication, usage. Synchronous SQLAlchemy;
the gateway calls it from worker threads.

Verified keys are cached (a bounded LRU keyed by the key's SHA-256, never its plaintext) for
`key_cache_ttl_s`: a request with a cached key reads nothing from the database. A key's expiry is checked on
every use, and any change made through this store (a revoke, a tenant updated, disabled or deleted) empties
the cache at once; a change made by another process (another gateway, `herd tenants`) takes effect here
within the TTL. A key's last use is kept in memory and written in one batch by `flush_last_used` (the usage
ledger calls it every few seconds and on close); a key read from the database has it written then.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, bindparam, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from herd.platform.settings import TenancySettings
from herd.platform.tenancy import keys as keymod
from herd.platform.tenancy.adapters import AdapterRef, granted
from herd.platform.tenancy.database import sessions
from herd.platform.tenancy.schema import TENANT_FIELDS, ApiKey, Tenant, UsageRecord


class NotFound(LookupError):
    """No such tenant or key (the message never names another tenant's data)."""


class Conflict(ValueError):
    """A tenant or key id that exists already."""


@dataclass(frozen=True)
class Identity:
    """Who a valid key belongs to: the tenant's settings and the LoRA adapters granted to it (by public name,
    <model>:<adapter>) as they were when the key was checked."""

    tenant: Tenant
    key_id: str | None
    adapters: Mapping[str, AdapterRef] = field(default_factory=dict)


@dataclass(frozen=True)
class _Verified:
    """A key the database confirmed: who it is, when it expires, and until when it is trusted unasked."""

    identity: Identity
    expires_at: datetime | None
    trusted_until: float  # on the store's monotonic clock


DEFAULT_KEY_CACHE_TTL_S: float = TenancySettings.model_fields["key_cache_ttl_s"].default
DEFAULT_KEY_CACHE_SIZE: int = TenancySettings.model_fields["key_cache_size"].default


class TenantStore:
    def __init__(self, engine: Engine, *, key_cache_ttl_s: float = DEFAULT_KEY_CACHE_TTL_S,
                 key_cache_size: int = DEFAULT_KEY_CACHE_SIZE, clock: Callable[[], float] = time.monotonic) -> None:
        if key_cache_ttl_s < 0 or key_cache_size < 0:
            raise ValueError(f"key_cache_ttl_s and key_cache_size must be >= 0, got {key_cache_ttl_s!r} and "
                             f"{key_cache_size!r}")
        self.engine = engine
        self.session = sessions(engine)
        self.key_cache_ttl_s = key_cache_ttl_s
        self.key_cache_size = key_cache_size
        self._clock = clock
        self._verified: OrderedDict[str, _Verified] = OrderedDict()  # key hash -> verified key, least recent first
        self._last_used: dict[str, datetime] = {}  # key id -> its latest use not yet written
        self._lock = threading.Lock()  # authenticate runs on worker threads
        self._generation = 0  # raised by every forget: a check that began before it is not cached

    # --- tenants --------------------------------------------------------------------------------
    def create_tenant(self, tenant_id: str, **fields: Any) -> Tenant:
        _check_fields(fields)
        fields.setdefault("name", tenant_id)
        fields.setdefault("allowed_models", ["*"])
        with self.session.begin() as s:
            if s.get(Tenant, tenant_id) is not None:
                raise Conflict(f"tenant {tenant_id!r} exists already")
            tenant = Tenant(id=tenant_id, **fields)
            s.add(tenant)
        return tenant

    def update_tenant(self, tenant_id: str, **fields: Any) -> Tenant:
        _check_fields(fields)
        with self.session.begin() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            for name, value in fields.items():
                setattr(tenant, name, value)
        self.forget_verified_keys()
        return tenant

    def delete_tenant(self, tenant_id: str) -> None:
        with self.session.begin() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            s.delete(tenant)
        self.forget_verified_keys()

    def get_tenant(self, tenant_id: str) -> Tenant:
        with self.session() as s:
            tenant = s.get(Tenant, tenant_id)
        if tenant is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        return tenant

    def list_tenants(self) -> list[Tenant]:
        with self.session() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.id)))

    # --- keys -----------------------------------------------------------------------------------
    def issue_key(self, tenant_id: str, *, name: str = "", expires_at: datetime | None = None) -> tuple[ApiKey, str]:
        """A new key for the tenant: the record, and the plaintext (returned this once, never stored)."""
        made = keymod.new_key()
        with self.session.begin() as s:
            if s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            key = ApiKey(id=uuid.uuid4().hex, tenant_id=tenant_id, prefix=made.prefix, key_hash=made.key_hash,
                         name=name, expires_at=expires_at)
            s.add(key)
        return key, made.plaintext

    def revoke_key(self, key_id: str) -> ApiKey:
        with self.session.begin() as s:
            key = s.get(ApiKey, key_id)
            if key is None:
                raise NotFound(f"no key {key_id!r}")
            key.revoked_at = key.revoked_at or datetime.now(UTC)
        self.forget_verified_keys()
        return key

    def rotate_key(self, key_id: str) -> tuple[ApiKey, str]:
        """Revoke a key and issue its replacement (same tenant, name and expiry)."""
        old = self.revoke_key(key_id)
        return self.issue_key(old.tenant_id, name=old.name, expires_at=old.expires_at)

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        with self.session() as s:
            return list(s.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)))

    def authenticate(self, plaintext: str, *, now: datetime | None = None) -> Identity | None:
        """The tenant of a valid key (not revoked, not expired, tenant enabled), else None."""
        prefix = keymod.prefix_of(plaintext)
        if prefix is None:
            return None
        now = now or datetime.now(UTC)
        key_hash = keymod.hash_key(plaintext)
        verified = self._cached(key_hash)
        if verified is None:
            verified = self._verify(plaintext, prefix, key_hash, now)
            if verified is None:
                return None
        elif verified.identity.key_id is not None:
            with self._lock:
                self._last_used[verified.identity.key_id] = now
        if verified.expires_at is not None and _aware(verified.expires_at) <= now:
            return None
        return verified.identity

    def _verify(self, plaintext: str, prefix: str, key_hash: str, now: datetime) -> _Verified | None:
        """Ask the database about a key; a good one is cached (expired or not: `authenticate` checks the
        expiry on every use), and its last use written."""
        generation = self._generation
        with self.session.begin() as s:
            key = s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
            if key is None or not keymod.matches(plaintext, key.key_hash) or key.revoked_at is not None:
                return None
            tenant = key.tenant
            if tenant.disabled:
                return None
            key.last_used_at = now
            s.flush()
            adapters = granted(s, tenant.id)
            s.expunge(tenant)
            verified = _Verified(Identity(tenant=tenant, key_id=key.id, adapters=adapters), key.expires_at,
                                 self._clock() + self.key_cache_ttl_s)
        with self._lock:
            if self.key_cache_ttl_s > 0 and self.key_cache_size > 0 and generation == self._generation:
                self._verified[key_hash] = verified
                self._verified.move_to_end(key_hash)
                while len(self._verified) > self.key_cache_size:
                    self._verified.popitem(last=False)
        return verified

    def _cached(self, key_hash: str) -> _Verified | None:
        with self._lock:
            verified = self._verified.get(key_hash)
            if verified is None:
                return None
            if self._clock() >= verified.trusted_until:
                del self._verified[key_hash]
                return None
            self._verified.move_to_end(key_hash)
            return verified

    def forget_verified_keys(self) -> None:
        """Empty the key cache: the next use of every key asks the database again."""
        with self._lock:
            self._verified.clear()
            self._generation += 1

    def flush_last_used(self) -> int:
        """Write the keys' last uses kept in memory, in one statement; how many keys. On a failure they are
        kept for the next call (and the error raised)."""
        with self._lock:
            pending, self._last_used = self._last_used, {}
        if not pending:
            return 0
        statement = (update(ApiKey).where(ApiKey.id == bindparam("key"),
                                          or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < bindparam("used")))
                     .values(last_used_at=bindparam("used")))
        try:
            with self.engine.begin() as connection:
                connection.execute(statement, [{"key": key, "used": used} for key, used in pending.items()])
        except Exception:
            with self._lock:
                for key, used in pending.items():
                    self._last_used[key] = max(used, self._last_used.get(key, used))
            raise
        return len(pending)

    # --- usage ----------------------------------------------------------------------------------
    def record_usage(self, records: Sequence[dict[str, Any]]) -> None:
        """Insert ledger rows; a request id already there (or twice in the batch) is written once, so
        retries, spills and two gateways racing are all safe."""
        # A journal written before usage.adapter existed holds rows without it: one set of columns for the insert.
        unique = [{"adapter": None, **r} for r in {r["request_id"]: r for r in records}.values()]
        if not unique:
            return
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        statement = insert(UsageRecord).values(unique).on_conflict_do_nothing(index_elements=["request_id"])
        with self.session.begin() as s:
            s.execute(statement)

    def tokens_used_since(self, tenant_id: str, since: datetime) -> int:
        with self.session() as s:
            tokens = func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens)
            total = s.scalar(select(func.coalesce(tokens, 0))
                             .where(UsageRecord.tenant_id == tenant_id, UsageRecord.time >= since))
        return int(total or 0)

    def usage(self, *, tenant_id: str | None = None, key_id: str | None = None, model: str | None = None,
              day: str | None = None, adapter: str | None = None) -> list[dict[str, Any]]:
        """Usage summed by tenant, key, model, LoRA adapter (None: the base model) and day (YYYY-MM-DD), filtered
        by any of them."""
        day_col = func.date(UsageRecord.time)  # UTC days: PostgreSQL sessions run in UTC (database.connect)
        query = select(UsageRecord.tenant_id, UsageRecord.key_id, UsageRecord.model, UsageRecord.adapter,
                       day_col.label("day"),
                       func.count().label("requests"), func.sum(UsageRecord.prompt_tokens).label("prompt_tokens"),
                       func.sum(UsageRecord.completion_tokens).label("completion_tokens"),
                       func.sum(UsageRecord.cached_tokens).label("cached_tokens"))
        for column, value in ((UsageRecord.tenant_id, tenant_id), (UsageRecord.key_id, key_id),
                              (UsageRecord.model, model), (UsageRecord.adapter, adapter)):
            if value is not None:
                query = query.where(column == value)
        if day is not None:
            try:
                start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
            except ValueError:
                raise ValueError(f"day must be YYYY-MM-DD, got {day!r}") from None
            query = query.where(UsageRecord.time >= start, UsageRecord.time < start + timedelta(days=1))
        query = query.group_by(UsageRecord.tenant_id, UsageRecord.key_id, UsageRecord.model, UsageRecord.adapter,
                                 day_col)
        with self.session() as s:
            rows = [dict(row._mapping) for row in s.execute(query.order_by("day"))]
        return [{**row, "day": str(row["day"])} for row in rows]

    def usage_rows(self, tenant_id: str) -> list[UsageRecord]:
        with self.session() as s:
            return list(s.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)
                                  .order_by(UsageRecord.id)))


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - set(TENANT_FIELDS))
    if unknown:
        raise ValueError(f"unknown tenant fields {unknown}; known: {list(TENANT_FIELDS)}")
    if "weight" in fields and not (isinstance(fields["weight"], (int, float)) and fields["weight"] > 0):
        raise ValueError(f"weight must be a positive number, got {fields['weight']!r}")
    if "allowed_models" in fields and not (isinstance(fields["allowed_models"], list)
                                           and all(isinstance(m, str) for m in fields["allowed_models"])):
        raise ValueError(f"allowed_models must be a list of model names, got {fields['allowed_models']!r}")


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were stored in UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


__all__ = ["Conflict", "Identity", "IntegrityError", "NotFound", "TenantStore"]
