"""The admin trail (``admin_changes``: who changed what through the admin API), the snapshot
serial SQL issues (``snapshot_serial``: one row, bumped in the transaction that reads the state it
publishes) and the per-key ``subject_trusted`` flag.

The serial row starts at 0; the first publish after the upgrade takes the current time in
nanoseconds (serials are ``max(previous + 1, now_ns)``), so it is newer than any serial the older,
time-stamped publisher wrote.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_changes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(48), nullable=False),
        sa.Column("resource_kind", sa.String(32), nullable=False),
        sa.Column("resource_name", sa.String(160), nullable=False, server_default=""),
        sa.Column("detail", sa.JSON(), nullable=True),
    )
    serial = op.create_table(
        "snapshot_serial",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("serial", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(serial, [{"id": 1, "serial": 0}])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("subject_trusted", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("subject_trusted")
    op.drop_table("snapshot_serial")
    op.drop_table("admin_changes")
