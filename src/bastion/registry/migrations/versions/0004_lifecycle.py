"""Version lifecycle: stages, metadata, signatures, approvals, evaluations; model policies and holdout
sets; tenant signing keys and consent flags.

Existing versions that a deployment routes to as primary become ``production``; the rest stay
``registered``.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("stage", sa.String(16), nullable=False, server_default="registered"))
        batch.add_column(sa.Column("meta", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("verified", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("signed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("approved_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("evaluation", sa.JSON(), nullable=True))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("holdout", sa.JSON(), nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("signing_key", sa.Text(), nullable=True))
        batch.add_column(sa.Column("consents", sa.JSON(), nullable=True))
    op.create_table(
        "version_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id"), nullable=False, index=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    bind = op.get_bind()
    deployments = sa.table("deployments", sa.column("model_id", sa.Integer()), sa.column("routes", sa.JSON()))
    versions = sa.table(
        "model_versions",
        sa.column("model_id", sa.Integer()),
        sa.column("version", sa.Integer()),
        sa.column("stage", sa.String()),
    )
    for model_id, routes in bind.execute(sa.select(deployments.c.model_id, deployments.c.routes)).all():
        for route in routes or []:
            if route.get("role") == "primary":
                bind.execute(
                    versions.update()
                    .where(versions.c.model_id == model_id, versions.c.version == int(route["version"]))
                    .values(stage="production")
                )


def downgrade() -> None:
    op.drop_table("version_events")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("consents")
        batch.drop_column("signing_key")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("holdout")
        batch.drop_column("policy")
    with op.batch_alter_table("model_versions") as batch:
        for column in ("evaluation", "approved_at", "approved_by", "signed_by", "verified", "meta", "stage"):
            batch.drop_column(column)
