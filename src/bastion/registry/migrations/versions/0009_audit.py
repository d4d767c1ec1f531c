"""The decision log (``bastion.audit.tables``): leaves, Merkle nodes, the head row, signed
checkpoints and their public keys, wrapped tenant secrets and data keys, encrypted payloads.

The head row starts at size 0 with ``admin_through`` 0: the first append after the upgrade logs
every admin change recorded before it, oldest first, so the trail's history is in the log too.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_leaves",
        sa.Column("position", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=True),
        sa.Column("subject", sa.String(64), nullable=True),
        sa.Column("model", sa.String(128), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_audit_leaves_subject", "audit_leaves", ["tenant", "subject", "position"])
    op.create_index("ix_audit_leaves_model", "audit_leaves", ["tenant", "model", "version", "position"])
    op.create_index("ix_audit_leaves_tenant", "audit_leaves", ["tenant", "position"])
    op.create_index("ix_audit_leaves_kind", "audit_leaves", ["kind", "position"])
    op.create_index("ix_audit_leaves_at", "audit_leaves", ["at"])
    op.create_table(
        "audit_nodes",
        sa.Column("level", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("admin_through", sa.BigInteger(), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "size": 0, "admin_through": 0}])
    op.create_table(
        "audit_checkpoints",
        sa.Column("size", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("root", sa.LargeBinary(), nullable=False),
        sa.Column("at_ms", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "audit_signing_keys",
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_tenant_secrets",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "audit_data_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("pseudonym", sa.String(64), nullable=False),
        sa.Column("day", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(32), nullable=False),
        sa.UniqueConstraint("tenant", "pseudonym", "day", name="uq_audit_data_keys_subject_day"),
        sqlite_autoincrement=True,  # never reuse an id: a destroyed key's payloads must name no new key
    )
    op.create_index("ix_audit_data_keys_day", "audit_data_keys", ["tenant", "day"])
    op.create_table(
        "audit_payloads",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("data_key_id", sa.Integer(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_payloads")
    op.drop_index("ix_audit_data_keys_day", "audit_data_keys")
    op.drop_table("audit_data_keys")
    op.drop_table("audit_tenant_secrets")
    op.drop_table("audit_signing_keys")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_head")
    op.drop_table("audit_nodes")
    for name in ("ix_audit_leaves_at", "ix_audit_leaves_kind", "ix_audit_leaves_tenant", "ix_audit_leaves_model"):
        op.drop_index(name, "audit_leaves")
    op.drop_index("ix_audit_leaves_subject", "audit_leaves")
    op.drop_table("audit_leaves")
