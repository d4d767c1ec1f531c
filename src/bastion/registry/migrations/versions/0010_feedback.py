"""Feedback labels joined to their decisions (``feedback``), what each decision predicted
(``decision_outcomes``, written by the decision log with each decision's leaf), and a model's
live-accuracy promotion gate (``models.live_gate``).

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("prediction_id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("label", sa.BigInteger(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("predicted", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("predicted_value", sa.Float(), nullable=True),
        sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replaced", sa.Integer(), nullable=False),
    )
    op.create_index("ix_feedback_model", "feedback", ["model", "predicted_at"])
    op.create_index("ix_feedback_predicted_at", "feedback", ["predicted_at"])
    op.create_table(
        "decision_outcomes",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(64), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("label", sa.BigInteger(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("classes", sa.Integer(), nullable=True),
        sa.Column("value", sa.Float(), nullable=True),
    )
    op.create_index("ix_decision_outcomes_subject", "decision_outcomes", ["tenant", "subject"])
    op.create_index("ix_decision_outcomes_at", "decision_outcomes", ["at"])
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("live_gate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("live_gate")
    op.drop_index("ix_decision_outcomes_at", "decision_outcomes")
    op.drop_index("ix_decision_outcomes_subject", "decision_outcomes")
    op.drop_table("decision_outcomes")
    op.drop_index("ix_feedback_predicted_at", "feedback")
    op.drop_index("ix_feedback_model", "feedback")
    op.drop_table("feedback")
