"""Alembic environment: the URL and connection come from herd (database.migrate), never from an ini."""

from __future__ import annotations

from alembic import context

from herd.platform.tenancy.schema import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through herd.platform.tenancy.database.migrate()")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
