"""The decision log's SQL tables (migration ``0009``; one metadata with the registry's).

Leaves and nodes are only ever added: nothing in Bastion updates or deletes a row of
``audit_leaves``, ``audit_nodes`` or ``audit_checkpoints``. Erasure and retention delete rows of
``audit_data_keys`` (crypto-shredding: the payloads they opened stay, unreadable) and of
``decision_outcomes``, which is no part of the tree.

=====================  ==========================================================================
table                  what
=====================  ==========================================================================
audit_leaves           one row per event: its position (0-based, contiguous), the canonical leaf
                       bytes and their leaf hash, and copies of a few leaf fields for search
audit_nodes            every perfect subtree of level >= 1 (level 0 is the leaf row's hash):
                       ``perfect(level, index)`` of any proof is one primary-key lookup
audit_head             one row: the tree's size and the last ``admin_changes.id`` logged; every
                       append first updates it, so appends run one at a time on every database
audit_checkpoints      signed (size, root, time) checkpoints
audit_signing_keys     the public key of every key that signed a checkpoint (rotation keeps old ones)
audit_tenant_secrets   each tenant's pseudonym secret, wrapped by the key-encryption key
audit_data_keys        per tenant, subject pseudonym and UTC day: a data key, wrapped
audit_payloads         an event's encrypted inputs and outputs (AES-256-GCM, the event id as
                       associated data) under one data key
decision_outcomes      (migration ``0010``) per decision, what it predicted: label, score, value,
                       rows (``audit/outcomes.py``), for live accuracy; apart from the tree: erasure
                       and the retention sweep (``accuracy_window_s``) delete its rows
=====================  ==========================================================================
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Float, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from bastion.registry.tables import Base, utcnow

HEAD_ID = 1


class AuditLeaf(Base):
    __tablename__ = "audit_leaves"
    __table_args__ = (
        Index("ix_audit_leaves_subject", "tenant", "subject", "position"),
        Index("ix_audit_leaves_model", "tenant", "model", "version", "position"),
        Index("ix_audit_leaves_tenant", "tenant", "position"),
        Index("ix_audit_leaves_kind", "kind", "position"),
        Index("ix_audit_leaves_at", "at"),
    )

    position: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    tenant: Mapped[str | None] = mapped_column(String(128), nullable=True)
    subject: Mapped[str | None] = mapped_column(String(64), nullable=True)  # pseudonym, never the subject
    model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)  # canonical leaf bytes (contract 2)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)  # SHA-256(0x00 || body)


class AuditNode(Base):
    __tablename__ = "audit_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class AuditHead(Base):
    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    admin_through: Mapped[int] = mapped_column(BigInteger)


class AuditCheckpoint(Base):
    __tablename__ = "audit_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary)
    at_ms: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(32))
    signature: Mapped[bytes] = mapped_column(LargeBinary)


class AuditSigningKey(Base):
    __tablename__ = "audit_signing_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)  # raw Ed25519, 32 bytes
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditTenantSecret(Base):
    __tablename__ = "audit_tenant_secrets"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditDataKey(Base):
    __tablename__ = "audit_data_keys"
    __table_args__ = (
        UniqueConstraint("tenant", "pseudonym", "day", name="uq_audit_data_keys_subject_day"),
        Index("ix_audit_data_keys_day", "tenant", "day"),
        {"sqlite_autoincrement": True},  # an id is never reused: a destroyed key's payloads name no new key
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(128))
    pseudonym: Mapped[str] = mapped_column(String(64))
    day: Mapped[int] = mapped_column(Integer)  # UTC days since the epoch of the events it encrypts
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(32))


class AuditPayload(Base):
    __tablename__ = "audit_payloads"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    data_key_id: Mapped[int] = mapped_column(Integer)  # no foreign key: the key may be destroyed
    nonce: Mapped[bytes] = mapped_column(LargeBinary)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


class DecisionOutcome(Base):
    """What one decision predicted (``audit/outcomes.py``), written with its leaf. Personal data
    linked to a decision, not evidence: erasure deletes its subject's rows, the retention sweep
    those older than ``accuracy_window_s``; the tree never depends on them."""

    __tablename__ = "decision_outcomes"
    __table_args__ = (
        Index("ix_decision_outcomes_subject", "tenant", "subject"),
        Index("ix_decision_outcomes_at", "at"),
    )

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the decision's (prediction) id
    tenant: Mapped[str] = mapped_column(String(128))
    subject: Mapped[str | None] = mapped_column(
        String(64), nullable=True
    )  # pseudonym (or its key's), never the subject
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rows: Mapped[int] = mapped_column(Integer)
    label: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the predicted class (one row)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)  # positive-class score / top probability
    classes: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the score output's columns
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # a one-row regression's value
