"""LoRA adapters registered on the models, the tenants granted each, and the adapter a usage row ran with.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("targets", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("model", "name", name="uq_adapters_model_name"),
    )
    op.create_table(
        "adapter_grants",
        sa.Column("adapter_id", sa.String(32), sa.ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant_id", sa.String(64), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_index("ix_adapter_grants_tenant_id", "adapter_grants", ["tenant_id"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("adapter", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("adapter")
    op.drop_index("ix_adapter_grants_tenant_id", table_name="adapter_grants")
    op.drop_table("adapter_grants")
    op.drop_table("adapters")
