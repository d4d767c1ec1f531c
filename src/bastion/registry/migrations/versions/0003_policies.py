"""Tenant jurisdiction and deployment policy rules.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("jurisdiction", sa.String(16), nullable=True))
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("rules", sa.JSON(), nullable=True))
    with op.batch_alter_table("deployment_events") as batch:
        batch.add_column(sa.Column("rules", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment_events") as batch:
        batch.drop_column("rules")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("rules")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("jurisdiction")
