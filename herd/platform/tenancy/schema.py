"""The tenancy tables (SQLAlchemy ORM): tenants, their API keys, the usage ledger, the LoRA adapters registered on
the models and the tenants granted each, and what the Responses and Batch APIs keep per tenant (stored responses,
files, batches and their lines).

The schema is owned by the Alembic migrations in migrations/versions; these classes describe the
head revision and are what the code reads and writes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    allowed_models: Mapped[list[str]] = mapped_column(JSON, default=list)  # ["*"]: every model
    requests_per_min: Mapped[int | None] = mapped_column(Integer)
    input_tokens_per_min: Mapped[int | None] = mapped_column(Integer)
    output_tokens_per_min: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    max_context: Mapped[int | None] = mapped_column(Integer)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    monthly_token_budget: Mapped[int | None] = mapped_column(BigInteger)
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    priority_class: Mapped[str] = mapped_column(String(32), default="standard")
    sharing_group: Mapped[str | None] = mapped_column(String(64))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")


TENANT_FIELDS: tuple[str, ...] = tuple(
    c.key for c in Tenant.__table__.columns if c.key not in ("id", "created_at", "updated_at")
)
"""What an operator sets on a tenant (its columns less the key and timestamps), in column order."""


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)  # public part, for lookup
    key_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of the whole key, hex
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class UsageRecord(Base):
    __tablename__ = "usage"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str] = mapped_column(String(100), unique=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32))  # ok, error, cancelled, refused, timeout
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    adapter: Mapped[str | None] = mapped_column(String(64))  # the LoRA adapter the request ran with (model: its base)


class Adapter(Base):
    """A LoRA adapter registered on a model (checked against it when registered), used as "<model>:<name>" by the
    tenants granted it. `id` is new at every registration, so a name registered again never reuses what a replica
    loaded (or cached) for the adapter it named before."""

    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("model", "name", name="uq_adapters_model_name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))  # PEFT's directory, readable where the model's replicas run
    rank: Mapped[int] = mapped_column(Integer)
    targets: Mapped[list[str]] = mapped_column(JSON, default=list)  # adapted modules, e.g. self_attn.q_proj
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AdapterGrant(Base):
    """A tenant may use an adapter."""

    __tablename__ = "adapter_grants"

    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True,
                                           index=True)


class StoredResponse(Base):
    """A Responses API response kept for GET and previous_response_id: readable only by its tenant, until
    expires_at (the retention setting)."""

    __tablename__ = "stored_responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    model: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    previous_response_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # the response object as it was returned
    conversation: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the chat messages a follow-up continues
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


class StoredFile(Base):
    """A file of the Files API (batch input, output and error files): its metadata; the bytes are in the file
    store under storage_key."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))  # batch, batch_output
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchJob(Base):
    """A Batch API job: its input file's lines run as requests of the tenant at batch priority."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))  # /v1/chat/completions, /v1/completions, /v1/responses
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))  # "24h"
    status: Mapped[str] = mapped_column(String(32), index=True)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchItem(Base):
    """One input line of a batch: pending until its output or error line (result) is written with its status."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_status", "batch_id", "status"),)

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))  # pending, completed, failed
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # the line's request body
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the output or error line
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
