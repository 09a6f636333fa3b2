"""`herd tenants ...`: manage tenants, keys, usage and LoRA adapters (registered on a model, granted to tenants),
directly in the database or through a running server's admin API. Prints JSON; a key's plaintext only when it is
created. An adapter registered through the database is checked against the model as the settings (--config)
serve it; through --url, against what that server serves.

A database password never goes on the command line, where every user of the machine reads it in the process
list: --db refuses a URL that carries one; such a URL comes from a file (--db-file) or from the settings
(HERD_TENANCY__DATABASE_URL, or tenancy.database_url in --config)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from herd.platform.settings import HerdSettings
from herd.platform.tenancy.adapter_registry import adapter_json
from herd.platform.tenancy.admin_api import key_json, tenant_json
from herd.platform.tenancy.database import connect, migrate
from herd.platform.tenancy.store import TenantStore

DATABASE_URL_ENV = "HERD_TENANCY__DATABASE_URL"
_LIMIT_FLAGS = {
    "rpm": "requests_per_min", "input_tpm": "input_tokens_per_min", "output_tpm": "output_tokens_per_min",
    "max_concurrent": "max_concurrent", "max_context": "max_context", "max_output": "max_output_tokens",
    "budget": "monthly_token_budget",
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tenants = commands.add_parser("tenants", help="tenants, API keys and usage (database or admin API)")
    source = tenants.add_mutually_exclusive_group()
    source.add_argument("--db", help="database URL without a password (default: the settings' tenancy.database_url, "
                        f"which {DATABASE_URL_ENV} sets)")
    source.add_argument("--db-file", type=Path, help="a file holding the database URL (one with a password)")
    tenants.add_argument("--url", help="a running server (uses its admin API instead of the database)")
    tenants.add_argument("--admin-token-file", type=Path, help="admin credential for --url")
    tenants.add_argument("--config", type=Path, help="settings file")
    actions = tenants.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="list tenants")
    for verb in ("create", "update"):
        p = actions.add_parser(verb, help=f"{verb} a tenant")
        p.add_argument("tenant")
        p.add_argument("--name")
        p.add_argument("--models", help="comma-separated model names, or * for all")
        for flag in _LIMIT_FLAGS:
            p.add_argument(f"--{flag.replace('_', '-')}", type=int)
        p.add_argument("--weight", type=float)
        p.add_argument("--priority-class")
        p.add_argument("--sharing-group")
    actions.add_parser("delete", help="delete a tenant").add_argument("tenant")
    key = actions.add_parser("key-create", help="issue an API key (printed once)")
    key.add_argument("tenant")
    key.add_argument("--name", default="")
    key.add_argument("--expires", help="ISO time the key stops working")
    actions.add_parser("key-revoke", help="revoke a key by id").add_argument("key_id")
    actions.add_parser("keys", help="list a tenant's keys").add_argument("tenant")
    usage = actions.add_parser("usage", help="usage summed by tenant, key, model, adapter and day")
    for name in ("tenant", "key", "model", "day", "adapter"):
        usage.add_argument(f"--{name}")
    actions.add_parser("adapters", help="list LoRA adapters and their tenants").add_argument("--model")
    register = actions.add_parser("adapter-register", help="check a PEFT adapter against a model and register it "
                                  "(clients ask for <model>:<name>)")
    for name in ("model", "name", "path"):
        register.add_argument(name)
    delete = actions.add_parser("adapter-delete", help="unregister an adapter")
    for verb in ("grant", "revoke"):
        grant = actions.add_parser(f"adapter-{verb}", help=f"{verb} a tenant's use of an adapter")
        for name in ("model", "name", "tenant"):
            grant.add_argument(name)
    for name in ("model", "name"):
        delete.add_argument(name)
    tenants.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    result = (_via_api if args.url else _via_database)(args)
    print(json.dumps(result, indent=2, default=str))
    return 0


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.name is not None:
        fields["name"] = args.name
    if args.models is not None:
        fields["allowed_models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    for flag, column in _LIMIT_FLAGS.items():
        if getattr(args, flag) is not None:
            fields[column] = getattr(args, flag)
    for flag in ("weight", "priority_class", "sharing_group"):
        if getattr(args, flag) is not None:
            fields[flag] = getattr(args, flag)
    return fields


def database_url(args: argparse.Namespace) -> tuple[str, float]:
    """The database URL from --db (refused with a password in it), --db-file or the settings; and the
    settings' database timeout."""
    if args.db is not None:
        try:
            url = make_url(args.db)
        except ArgumentError:
            raise ValueError("--db is not a database URL (sqlite:///path or postgresql+psycopg://...)") from None
        if url.password is not None or "password" in url.query:
            raise ValueError("--db carries a password, which every user of this machine can read in the process "
                             f"list; put the URL in a file and pass --db-file, or set {DATABASE_URL_ENV}")
    settings = HerdSettings.load(args.config).tenancy
    if args.db_file is not None:
        return args.db_file.read_text().strip(), settings.database_timeout_s
    return args.db or settings.database_url, settings.database_timeout_s


def _via_database(args: argparse.Namespace) -> object:
    """The action's result as JSON-ready data."""
    url, timeout_s = database_url(args)
    engine = connect(url, timeout_s=timeout_s)
    try:
        migrate(engine)
    except OperationalError as err:  # its text names the host and the driver's reason, never the password
        raise ValueError(f"the database did not answer: {str(err.orig or err).strip().splitlines()[0]}") from err
    store = TenantStore(engine)
    action = args.action
    if action.startswith("adapter"):
        return _adapters(args, store)
    if action == "list":
        return [tenant_json(t) for t in store.list_tenants()]
    if action == "create":
        return tenant_json(store.create_tenant(args.tenant, **_fields(args)))
    if action == "update":
        return tenant_json(store.update_tenant(args.tenant, **_fields(args)))
    if action == "delete":
        store.delete_tenant(args.tenant)
        return {"deleted": args.tenant}
    if action == "key-create":
        expires = datetime.fromisoformat(args.expires) if args.expires else None
        key, plaintext = store.issue_key(args.tenant, name=args.name, expires_at=expires)
        return {**key_json(key), "key": plaintext}
    if action == "key-revoke":
        return key_json(store.revoke_key(args.key_id))
    if action == "keys":
        return [key_json(k) for k in store.list_keys(args.tenant)]
    return store.usage(tenant_id=args.tenant, key_id=args.key, model=args.model, day=args.day, adapter=args.adapter)


def _adapters(args: argparse.Namespace, store: TenantStore) -> object:
    """An adapter action on the database, checking against the models the settings serve."""
    from herd.platform.server import adapter_registry

    registry = adapter_registry(HerdSettings.load(args.config), store)
    action = args.action
    if action == "adapters":
        return [adapter_json(a, tenants) for a, tenants in registry.list_adapters(args.model)]
    if action == "adapter-register":
        return adapter_json(registry.register(args.model, args.name, args.path), [])
    if action == "adapter-delete":
        registry.delete(args.model, args.name)
        return {"deleted": f"{args.model}:{args.name}"}
    verb = registry.grant if action == "adapter-grant" else registry.revoke
    return adapter_json(*verb(args.model, args.name, args.tenant))


def _via_api(args: argparse.Namespace) -> object:
    """The admin API's JSON answer to the action."""
    token_file = args.admin_token_file or HerdSettings.load(args.config).tenancy.admin_token_file
    headers = {"authorization": f"Bearer {Path(token_file).read_text().strip()}"}
    base = args.url.rstrip("/") + "/admin/v1"
    action = args.action
    routes: dict[str, tuple[str, str, Any]] = {
        "list": ("GET", "/tenants", None),
        "create": ("POST", "/tenants", {"id": getattr(args, "tenant", None), **(_fields(args) if action == "create"
                                                                                 else {})}),
        "update": ("PATCH", f"/tenants/{getattr(args, 'tenant', '')}",
                   _fields(args) if action == "update" else None),
        "delete": ("DELETE", f"/tenants/{getattr(args, 'tenant', '')}", None),
        "key-create": ("POST", f"/tenants/{getattr(args, 'tenant', '')}/keys",
                       {"name": getattr(args, "name", ""), "expires_at": getattr(args, "expires", None)}),
        "key-revoke": ("POST", f"/keys/{getattr(args, 'key_id', '')}/revoke", None),
        "keys": ("GET", f"/tenants/{getattr(args, 'tenant', '')}/keys", None),
        "usage": ("GET", "/usage", None),
        "adapters": ("GET", "/adapters", None),
        "adapter-register": ("POST", "/adapters", {"model": getattr(args, "model", None),
                                                   "name": getattr(args, "name", None),
                                                   "path": str(Path(getattr(args, "path", "") or "").resolve())}),
        "adapter-delete": ("DELETE", f"/adapters/{getattr(args, 'model', '')}/{getattr(args, 'name', '')}", None),
        "adapter-grant": ("POST", f"/adapters/{getattr(args, 'model', '')}/{getattr(args, 'name', '')}/grants",
                          {"tenant_id": getattr(args, "tenant", None)}),
        "adapter-revoke": ("DELETE", f"/adapters/{getattr(args, 'model', '')}/{getattr(args, 'name', '')}/grants/"
                           f"{getattr(args, 'tenant', '')}", None),
    }
    method, path, body = routes[action]
    filters = (("tenant_id", getattr(args, "tenant", None)), ("key_id", getattr(args, "key", None)),
               ("model", getattr(args, "model", None)), ("day", getattr(args, "day", None)),
               ("adapter", getattr(args, "adapter", None)))
    params = {k: v for k, v in filters if v is not None} if action in ("usage", "adapters") else None
    response = httpx.request(method, base + path, headers=headers, json=body, params=params, timeout=30)
    if response.status_code >= 400:
        raise ValueError(f"admin API answered {response.status_code}: {response.json()['error']['message']}")
    return response.json() if response.content else {"ok": True}
