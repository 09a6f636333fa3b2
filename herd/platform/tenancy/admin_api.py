"""The admin API under /admin/v1 (its own credential, never a tenant key): tenants, keys, usage, and the LoRA
adapters registered on the models with the tenants granted each.

A key's plaintext appears in exactly one response, the one that creates it; afterwards only its id
and public prefix exist anywhere outside the hash.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from herd.platform.gateway.errors import (
    admin_unauthenticated,
    already_exists,
    bearer_credential,
    invalid_request,
    not_found,
)
from herd.platform.tenancy.adapter_registry import AdapterRegistry, adapter_json
from herd.platform.tenancy.adapters import NAME_PATTERN
from herd.platform.tenancy.schema import TENANT_FIELDS, ApiKey, Tenant
from herd.platform.tenancy.store import Conflict, NotFound, TenantStore


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


INT64_MAX = 2**63 - 1  # the database's integer columns

P = ParamSpec("P")
R = TypeVar("R")


class TenantFields(_Body):
    """A tenant's settable fields as the admin API takes them (one per column of TENANT_FIELDS, checked by a test)."""

    name: str | None = None
    allowed_models: list[str] | None = Field(None, description='model names, or ["*"] for all')
    requests_per_min: int | None = Field(None, ge=1, le=INT64_MAX)
    input_tokens_per_min: int | None = Field(None, ge=1, le=INT64_MAX)
    output_tokens_per_min: int | None = Field(None, ge=1, le=INT64_MAX)
    max_concurrent: int | None = Field(None, ge=1, le=INT64_MAX)
    max_context: int | None = Field(None, ge=1, le=INT64_MAX)
    max_output_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    monthly_token_budget: int | None = Field(None, ge=0, le=INT64_MAX)
    weight: float | None = Field(None, gt=0)
    priority_class: str | None = None
    sharing_group: str | None = None
    disabled: bool | None = None


class NewTenant(TenantFields):
    id: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")


class NewKey(_Body):
    name: str = ""
    expires_at: datetime | None = None


class NewAdapter(_Body):
    model: str = Field(min_length=1, description="the served model it adapts")
    name: str = Field(pattern=NAME_PATTERN, description="clients ask for <model>:<name>")
    path: str = Field(min_length=1, description="PEFT adapter directory, readable where the replicas run")


class AdapterGrantBody(_Body):
    tenant_id: str = Field(min_length=1)


def tenant_json(tenant: Tenant) -> dict[str, Any]:
    return {f: getattr(tenant, f) for f in ("id", *TENANT_FIELDS)}


def key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": key.id, "tenant_id": key.tenant_id, "prefix": key.prefix, "name": key.name,
            "created_at": _iso(key.created_at), "expires_at": _iso(key.expires_at),
            "revoked_at": _iso(key.revoked_at), "last_used_at": _iso(key.last_used_at)}


def admin_router(store: TenantStore, admin_token: str, adapters: AdapterRegistry | None = None) -> APIRouter:
    """The admin routes; the adapter routes with `adapters` (a registry checking against the served models)."""
    expected = admin_token.encode()

    async def admin(request: Request) -> None:
        # Compared as bytes: compare_digest takes str only when both are ASCII (a TypeError, a 500, otherwise).
        credential = bearer_credential(request.headers.get("authorization"))
        if credential is None or not hmac.compare_digest(credential.encode(), expected):
            raise admin_unauthenticated()

    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(admin)], tags=["admin"])

    async def call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except NotFound as err:
            raise not_found(str(err)) from err
        except Conflict as err:
            raise already_exists(str(err)) from err
        except ValueError as err:
            raise invalid_request(str(err)) from err

    @router.post("/tenants", status_code=201)
    async def create_tenant(body: NewTenant) -> JSONResponse:
        fields = body.model_dump(exclude_none=True, exclude={"id"})
        return JSONResponse(tenant_json(await call(store.create_tenant, body.id, **fields)), status_code=201)

    @router.get("/tenants")
    async def list_tenants() -> list[dict[str, Any]]:
        return [tenant_json(t) for t in await call(store.list_tenants)]

    @router.get("/tenants/{tenant_id}")
    async def get_tenant(tenant_id: str) -> dict[str, Any]:
        return tenant_json(await call(store.get_tenant, tenant_id))

    @router.patch("/tenants/{tenant_id}")
    async def update_tenant(tenant_id: str, body: TenantFields) -> dict[str, Any]:
        return tenant_json(await call(store.update_tenant, tenant_id, **body.model_dump(exclude_unset=True)))

    @router.delete("/tenants/{tenant_id}", status_code=204)
    async def delete_tenant(tenant_id: str) -> None:
        await call(store.delete_tenant, tenant_id)

    @router.post("/tenants/{tenant_id}/keys", status_code=201)
    async def issue_key(tenant_id: str, body: NewKey) -> JSONResponse:
        key, plaintext = await call(store.issue_key, tenant_id, name=body.name, expires_at=body.expires_at)
        return JSONResponse({**key_json(key), "key": plaintext}, status_code=201)

    @router.get("/tenants/{tenant_id}/keys")
    async def list_keys(tenant_id: str) -> list[dict[str, Any]]:
        await call(store.get_tenant, tenant_id)
        return [key_json(k) for k in await call(store.list_keys, tenant_id)]

    @router.post("/keys/{key_id}/revoke")
    async def revoke_key(key_id: str) -> dict[str, Any]:
        return key_json(await call(store.revoke_key, key_id))

    @router.post("/keys/{key_id}/rotate", status_code=201)
    async def rotate_key(key_id: str) -> JSONResponse:
        key, plaintext = await call(store.rotate_key, key_id)
        return JSONResponse({**key_json(key), "key": plaintext}, status_code=201)

    @router.get("/usage")
    async def usage(tenant_id: str | None = None, key_id: str | None = None, model: str | None = None,
                    day: str | None = None, adapter: str | None = None) -> list[dict[str, Any]]:
        return await call(store.usage, tenant_id=tenant_id, key_id=key_id, model=model, day=day, adapter=adapter)

    if adapters is not None:
        _adapter_routes(router, adapters, call)
    return router


def _adapter_routes(router: APIRouter, adapters: AdapterRegistry, call: Any) -> None:
    @router.post("/adapters", status_code=201)
    async def register_adapter(body: NewAdapter) -> JSONResponse:
        adapter = await call(adapters.register, body.model, body.name, body.path)
        return JSONResponse(adapter_json(adapter, []), status_code=201)

    @router.get("/adapters")
    async def list_adapters(model: str | None = None) -> list[dict[str, Any]]:
        return [adapter_json(a, tenants) for a, tenants in await call(adapters.list_adapters, model)]

    @router.get("/adapters/{model}/{name}")
    async def get_adapter(model: str, name: str) -> dict[str, Any]:
        return adapter_json(*await call(adapters.get, model, name))

    @router.delete("/adapters/{model}/{name}", status_code=204)
    async def delete_adapter(model: str, name: str) -> None:
        await call(adapters.delete, model, name)

    @router.post("/adapters/{model}/{name}/grants")
    async def grant_adapter(model: str, name: str, body: AdapterGrantBody) -> dict[str, Any]:
        return adapter_json(*await call(adapters.grant, model, name, body.tenant_id))

    @router.delete("/adapters/{model}/{name}/grants/{tenant_id}")
    async def revoke_adapter(model: str, name: str, tenant_id: str) -> dict[str, Any]:
        return adapter_json(*await call(adapters.revoke, model, name, tenant_id))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
