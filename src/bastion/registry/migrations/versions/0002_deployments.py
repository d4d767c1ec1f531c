"""Deployments (weighted routes, fallback, kill switch) and their history.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("routes", sa.JSON(), nullable=False),
        sa.Column("fallback_version", sa.Integer(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deployment_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False, index=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("routes", sa.JSON(), nullable=False),
        sa.Column("fallback_version", sa.Integer(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Models registered before deployments existed: route all traffic to their current version.
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, current_version FROM models WHERE current_version IS NOT NULL")).fetchall()
    deployments = sa.table(
        "deployments",
        sa.column("model_id", sa.Integer()),
        sa.column("routes", sa.JSON()),
        sa.column("fallback_version", sa.Integer()),
        sa.column("disabled", sa.Boolean()),
        sa.column("updated_by", sa.String()),
        sa.column("updated_at", sa.DateTime(timezone=True)),
    )
    now = sa.func.now()
    for model_id, version in rows:
        op.execute(
            deployments.insert().values(
                model_id=model_id,
                routes=[{"version": version, "weight": 100, "role": "primary"}],
                fallback_version=None,
                disabled=False,
                updated_by="migration",
                updated_at=now,
            )
        )


def downgrade() -> None:
    op.drop_table("deployment_events")
    op.drop_table("deployments")
