"""SQLAlchemy 2 tables. Migrations in ``registry/migrations`` must match these."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    jurisdiction: Mapped[str | None] = mapped_column(String(16), nullable=True)
    signing_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    consents: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # how long the decision log keeps this tenant's inputs and outputs (encrypted), seconds; None: not kept
    retain_payloads_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    tier: Mapped[str | None] = mapped_column(String(32), nullable=True)
    subject_trusted: Mapped[bool] = mapped_column(default=False)  # may name its subject (X-Bastion-Subject)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    current_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    holdout: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    serving: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # the live-accuracy promotion gate (registry.lifecycle.LiveGate), apart from ``policy``
    live_gate: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # the guard policy of a text model (``bastion.guards.GuardPolicy.to_dict()``; None: every guard off)
    guards: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    signature: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    stage: Mapped[str] = mapped_column(String(16), default="registered")
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    verified: Mapped[bool] = mapped_column(default=False)
    signed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    approved_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class VersionEvent(Base):
    """Append-only history of a version: registered, evaluated, approved, stage changes."""

    __tablename__ = "version_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Deployment(Base):
    """How a model's traffic is routed now: weighted routes, a fallback, and the kill switch."""

    __tablename__ = "deployments"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    routes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    rules: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    fallback_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    disabled: Mapped[bool] = mapped_column(default=False)
    updated_by: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeploymentEvent(Base):
    """Append-only history of a model's deployments; rollback reads it."""

    __tablename__ = "deployment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    routes: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    rules: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    fallback_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    disabled: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AdminChange(Base):
    """Append-only trail of the admin API's state changes: who (principal id) did what to which
    resource, with a detail document that never holds a secret."""

    __tablename__ = "admin_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    principal_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(48))
    resource_kind: Mapped[str] = mapped_column(String(32))
    resource_name: Mapped[str] = mapped_column(String(160), default="")
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class SnapshotSerial(Base):
    """One row: the serial of the newest snapshot read for publishing. Bumping it takes the row's
    write lock, so snapshot reads are serialised and their serials follow their order."""

    __tablename__ = "snapshot_serial"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    serial: Mapped[int] = mapped_column(BigInteger)


class Feedback(Base):
    """One label per prediction (``POST /v1/predictions/{id}/feedback``), joined to its decision in
    the decision log when it arrived: who owns it, which version and role answered, and what it
    predicted, copied from the decision's outcome (``bastion.audit.tables.DecisionOutcome``):
    ``predicted`` class and positive-class ``score``, or ``predicted_value``; NULL when the
    outcome has none (several rows, say): such a label is counted, not graded. Personal data:
    erasure deletes the subject's labels, the retention sweep those of predictions older than
    ``accuracy_window_s``."""

    __tablename__ = "feedback"
    __table_args__ = (
        Index("ix_feedback_model", "model", "predicted_at"),
        Index("ix_feedback_predicted_at", "predicted_at"),  # the retention sweep (audit/retention.py)
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prediction_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    label: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the true class
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # the true value (regression)
    predicted: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    predicted_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    predicted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    labelled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    replaced: Mapped[int] = mapped_column(Integer, default=0)  # how many times the label was replaced
