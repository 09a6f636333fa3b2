"""A LoRA adapter as the gateway routes it, and the adapters a tenant was granted.

A tenant names an adapter as `<model>:<adapter>` (listed in its /v1/models); the gateway finds it among those
granted to the tenant, which are read with the tenant when its key is verified (and cached with the key, so a
request reads nothing more from the database), and sends the replica its engine name and path.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from herd.platform.tenancy.schema import Adapter, AdapterGrant

SEPARATOR = ":"
"""Between a model's name and an adapter's in what a client asks for: scout:support-bot."""
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$"
"""An adapter's name (no SEPARATOR, so `<model>:<adapter>` splits one way)."""


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: its registration's id, base model, name and directory."""

    id: str
    model: str
    name: str
    path: str

    @property
    def public_name(self) -> str:
        """What a client passes as `model`: <model>:<adapter>."""
        return f"{self.model}{SEPARATOR}{self.name}"

    @property
    def engine_name(self) -> str:
        """The name a replica registers it under: unique per registration (a name registered again is new)."""
        return f"{self.name}@{self.id}"

    @classmethod
    def of(cls, row: Adapter) -> AdapterRef:
        return cls(id=row.id, model=row.model, name=row.name, path=row.path)


def split_model(requested: str) -> tuple[str, str | None]:
    """`scout:bot` -> ("scout", "bot"); `scout` -> ("scout", None). Splits at the last separator."""
    model, separator, adapter = requested.rpartition(SEPARATOR)
    return (model, adapter) if separator and model and adapter else (requested, None)


def granted(session: Session, tenant_id: str) -> dict[str, AdapterRef]:
    """The adapters `tenant_id` may use, by public name."""
    rows = session.scalars(select(Adapter).join(AdapterGrant, AdapterGrant.adapter_id == Adapter.id)
                           .where(AdapterGrant.tenant_id == tenant_id))
    return {ref.public_name: ref for ref in map(AdapterRef.of, rows)}


__all__ = ["NAME_PATTERN", "SEPARATOR", "AdapterRef", "granted", "split_model"]
