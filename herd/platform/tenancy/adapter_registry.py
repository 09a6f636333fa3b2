"""The LoRA adapters registered on the models and who may use them: the operations behind the admin API and
`herd tenants adapter-*`.

An adapter is checked against its model before it is registered (herd.platform.tenancy.adapter_check: the
caller's `check`), so a malformed or mismatched one is refused here, never at request time. Grants are read
with a tenant's key (herd.platform.tenancy.adapters.granted); every change here empties the store's key cache,
so this gateway sees it at once and others within the key cache's TTL.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from herd.platform.tenancy.adapters import NAME_PATTERN
from herd.platform.tenancy.schema import Adapter, AdapterGrant, Tenant
from herd.platform.tenancy.store import Conflict, NotFound, TenantStore

AdapterCheck = Callable[[str, str], tuple[str, int, list[str]]]
"""(model, path) -> (the adapter's resolved path, its rank, its adapted modules); ValueError if it cannot run on
the model (or the model serves no adapters); NotFound for a model not served."""


class AdapterRegistry:
    def __init__(self, store: TenantStore, check: AdapterCheck) -> None:
        self.store = store
        self.check = check

    def register(self, model: str, name: str, path: str) -> Adapter:
        """Check the adapter at `path` against `model` and register it as <model>:<name> (granted to no one)."""
        if not re.fullmatch(NAME_PATTERN, name):
            raise ValueError(f"an adapter name is 1-64 letters, digits, '_', '.' or '-' (starting with a letter or "
                             f"digit), got {name!r}")
        resolved, rank, targets = self.check(model, path)
        with self.store.session.begin() as s:
            if _find(s, model, name) is not None:
                raise Conflict(f"adapter {model}:{name} exists already")
            adapter = Adapter(id=uuid.uuid4().hex, model=model, name=name, path=resolved, rank=rank, targets=targets)
            s.add(adapter)
        return adapter

    def list_adapters(self, model: str | None = None) -> list[tuple[Adapter, list[str]]]:
        """Every adapter (of `model`, when given) with the tenants granted it, by model and name."""
        with self.store.session() as s:
            query = select(Adapter).order_by(Adapter.model, Adapter.name)
            if model is not None:
                query = query.where(Adapter.model == model)
            return [(a, _tenants(s, a.id)) for a in s.scalars(query)]

    def get(self, model: str, name: str) -> tuple[Adapter, list[str]]:
        with self.store.session() as s:
            adapter = _require(s, model, name)
            return adapter, _tenants(s, adapter.id)

    def delete(self, model: str, name: str) -> None:
        """Unregister the adapter (its grants go with it; requests already running finish with it)."""
        with self.store.session.begin() as s:
            s.delete(_require(s, model, name))
        self.store.forget_verified_keys()

    def grant(self, model: str, name: str, tenant_id: str) -> tuple[Adapter, list[str]]:
        """Let `tenant_id` use the adapter (granting twice is granting once)."""
        with self.store.session.begin() as s:
            adapter = _require(s, model, name)
            if s.get(Tenant, tenant_id) is None:
                raise NotFound(f"no tenant {tenant_id!r}")
            if s.get(AdapterGrant, (adapter.id, tenant_id)) is None:
                s.add(AdapterGrant(adapter_id=adapter.id, tenant_id=tenant_id))
        self.store.forget_verified_keys()
        return self.get(model, name)

    def revoke(self, model: str, name: str, tenant_id: str) -> tuple[Adapter, list[str]]:
        """`tenant_id` may no longer use the adapter (NotFound if it could not)."""
        with self.store.session.begin() as s:
            adapter = _require(s, model, name)
            grant = s.get(AdapterGrant, (adapter.id, tenant_id))
            if grant is None:
                raise NotFound(f"tenant {tenant_id!r} has no grant of adapter {model}:{name}")
            s.delete(grant)
        self.store.forget_verified_keys()
        return self.get(model, name)


def _find(s: Session, model: str, name: str) -> Adapter | None:
    return s.scalars(select(Adapter).where(Adapter.model == model, Adapter.name == name)).one_or_none()


def _require(s: Session, model: str, name: str) -> Adapter:
    adapter = _find(s, model, name)
    if adapter is None:
        raise NotFound(f"no adapter {model}:{name}")
    return adapter


def _tenants(s: Session, adapter_id: str) -> list[str]:
    return list(s.scalars(select(AdapterGrant.tenant_id).where(AdapterGrant.adapter_id == adapter_id)
                          .order_by(AdapterGrant.tenant_id)))


def adapter_json(adapter: Adapter, tenants: list[str]) -> dict[str, object]:
    return {"id": f"{adapter.model}:{adapter.name}", "model": adapter.model, "name": adapter.name,
            "path": adapter.path, "rank": adapter.rank, "targets": adapter.targets, "tenants": tenants,
            "created_at": None if adapter.created_at is None else adapter.created_at.isoformat()}


__all__ = ["AdapterCheck", "AdapterRegistry", "adapter_json"]
