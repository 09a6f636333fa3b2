"""Stored Responses API responses (the stored_responses table): what GET /v1/responses/{id} returns and what a
follow-up's previous_response_id continues.

Invariant: a row is read or deleted only by its own tenant and only before its expires_at; anything else is "no
such response" (None, False), so another tenant's id and an expired one look exactly like an unknown one.
Synchronous SQLAlchemy, called from worker threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Table, create_engine, delete, select
from sqlalchemy.pool import StaticPool

from herd.platform.tenancy.database import sessions
from herd.platform.tenancy.schema import StoredResponse

DEFAULT_RETENTION_DAYS = 30.0


@dataclass(frozen=True)
class Stored:
    """A stored response as a follow-up or a GET sees it."""

    id: str
    body: dict[str, Any]  # the response object as it was returned
    conversation: list[dict[str, Any]]  # chat messages, this response's reply last


class ResponseStore:
    """Responses per tenant, kept `retention_days` after they are made."""

    def __init__(self, engine: Engine, *, retention_days: float = DEFAULT_RETENTION_DAYS,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), serialize: bool = False) -> None:
        if retention_days <= 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days!r}")
        self.engine = engine
        self.session = sessions(engine)
        self.retention = timedelta(days=retention_days)
        self.clock = clock
        self._lock: threading.Lock | None = threading.Lock() if serialize else None  # one shared connection

    @classmethod
    def in_memory(cls, *, retention_days: float = DEFAULT_RETENTION_DAYS) -> ResponseStore:
        """A store in this process's memory only (a gateway without a tenancy database: --no-auth, tests)."""
        engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
        cast(Table, StoredResponse.__table__).create(engine)
        return cls(engine, retention_days=retention_days, serialize=True)

    @contextlib.contextmanager
    def _serialized(self) -> Iterator[None]:
        if self._lock is None:
            yield
            return
        with self._lock:
            yield

    def save(self, tenant_id: str, *, response_id: str, model: str, status: str, previous_response_id: str | None,
             body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep a response (and drop the tenant's expired ones, so the table holds what is retained)."""
        now = self.clock()
        with self._serialized(), self.session.begin() as s:
            s.execute(delete(StoredResponse).where(StoredResponse.tenant_id == tenant_id,
                                                   StoredResponse.expires_at <= now))
            s.add(StoredResponse(id=response_id, tenant_id=tenant_id, model=model, status=status,
                                 previous_response_id=previous_response_id, body=body, conversation=conversation,
                                 created_at=now, expires_at=now + self.retention))

    def get(self, tenant_id: str, response_id: str) -> Stored | None:
        """The tenant's response, None when unknown, another tenant's or expired."""
        with self._serialized(), self.session() as s:
            row = s.scalars(select(StoredResponse).where(*self._visible(tenant_id, response_id))).first()
            return None if row is None else Stored(id=row.id, body=dict(row.body), conversation=list(row.conversation))

    def delete(self, tenant_id: str, response_id: str) -> bool:
        """Forget the tenant's response; False when there was none to forget (unknown, another's, expired)."""
        with self._serialized(), self.session.begin() as s:
            result = s.execute(delete(StoredResponse).where(*self._visible(tenant_id, response_id)))
            return bool(cast(CursorResult[Any], result).rowcount)

    def _visible(self, tenant_id: str, response_id: str) -> tuple[Any, ...]:
        return (StoredResponse.id == response_id, StoredResponse.tenant_id == tenant_id,
                StoredResponse.expires_at > self.clock())
