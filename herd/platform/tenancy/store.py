"""The tenancy database's operations: tenants, keys, authentication, usage. Synchronous SQLAlchemy;
the gateway calls it from worker threads."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from herd.platform.tenancy import keys as keymod
from herd.platform.tenancy.database import sessions
from herd.platform.tenancy.schema import TENANT_FIELDS, ApiKey, Tenant, UsageRecord


class NotFound(LookupError):
    """No such tenant or key (the message never names another tenant's data)."""


class Conflict(ValueError):
    """A tenant or key id that exists already."""


@dataclass(frozen=True)
class Identity:
    """Who a valid key belongs to: the tenant's settings as they were when the key was checked."""

    tenant: Tenant
    key_id: str | None


class TenantStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.session = sessions(engine)

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
        return tenant

    def delete_tenant(self, tenant_id: str) -> None:
        with self.session.begin() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            s.delete(tenant)

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
        with self.session.begin() as s:
            key = s.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()
            if key is None or not keymod.matches(plaintext, key.key_hash) or key.revoked_at is not None:
                return None
            if key.expires_at is not None and _aware(key.expires_at) <= now:
                return None
            tenant = key.tenant
            if tenant.disabled:
                return None
            key.last_used_at = now
            s.flush()
            s.expunge(tenant)
            return Identity(tenant=tenant, key_id=key.id)

    # --- usage ----------------------------------------------------------------------------------
    def record_usage(self, records: Sequence[dict[str, Any]]) -> None:
        """Insert ledger rows; a request id already there (or twice in the batch) is written once, so
        retries, spills and two gateways racing are all safe."""
        unique = list({r["request_id"]: r for r in records}.values())
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
              day: str | None = None) -> list[dict[str, Any]]:
        """Usage summed by tenant, key, model and day (YYYY-MM-DD), filtered by any of them."""
        day_col = func.date(UsageRecord.time)  # UTC days: PostgreSQL sessions run in UTC (database.connect)
        query = select(UsageRecord.tenant_id, UsageRecord.key_id, UsageRecord.model, day_col.label("day"),
                       func.count().label("requests"), func.sum(UsageRecord.prompt_tokens).label("prompt_tokens"),
                       func.sum(UsageRecord.completion_tokens).label("completion_tokens"),
                       func.sum(UsageRecord.cached_tokens).label("cached_tokens"))
        for column, value in ((UsageRecord.tenant_id, tenant_id), (UsageRecord.key_id, key_id),
                              (UsageRecord.model, model)):
            if value is not None:
                query = query.where(column == value)
        if day is not None:
            try:
                start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
            except ValueError:
                raise ValueError(f"day must be YYYY-MM-DD, got {day!r}") from None
            query = query.where(UsageRecord.time >= start, UsageRecord.time < start + timedelta(days=1))
        query = query.group_by(UsageRecord.tenant_id, UsageRecord.key_id, UsageRecord.model, day_col)
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
