"""Leaf documents (contract 2): what the decision log stores of a decision or an admin change.

Guarantees:

- **Canonical bytes.** A leaf is ``orjson.dumps(doc, option=OPT_SORT_KEYS)`` of its document;
  the document of an event depends on the event alone (and its subject's pseudonym), so the same
  event always gives the same bytes and existing logs keep verifying.
- **Total.** A malformed member never raises: a string member that is not a string becomes
  ``""``, an integer one ``0``; the leaf keeps the evidence that the event arrived.
- **Nothing in clear.** A decision leaf names its subject by pseudonym only and its inputs and
  outputs by SHA-256 digests; the payload to seal (``Leaf.sealed``) never enters the body.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from hashlib import sha256
from typing import Any

import orjson

from bastion import logs
from bastion.audit.crypto import key_subject, subject_digest
from bastion.registry.tables import AdminChange
from bastion.timefmt import iso_utc

log = logs.get("bastion.audit")

ERASE_ACTION = "subject.erase"
DAY_MS = 86_400_000
EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE = "0" * 32
_LIFTED = ("route", "body_sha256", "status")  # detail members an admin leaf carries at its top level


@dataclass(frozen=True, slots=True)
class Decision:
    """One ``audit`` stream entry (contract 1) as the consumer read it: the producer's event,
    the outputs as answered, the inputs when the tenant keeps payloads."""

    event: dict[str, Any]
    outputs: bytes
    inputs: bytes | None = None
    entry_id: str = ""


@dataclass(slots=True)
class Leaf:
    event_id: str
    kind: str
    at: datetime
    tenant: str | None
    subject: str | None
    model: str | None
    version: int | None
    body: bytes
    sealed: bytes | None = None  # the payload to seal (decisions kept by their tenant)
    owner: tuple[str, str, int] | None = None  # (tenant, pseudonym, day) of its data key
    outcome: dict[str, Any] | None = None  # its ``decision_outcomes`` row (``AuditLog.prepare``)


def canonical(doc: dict[str, Any]) -> bytes:
    """The leaf's canonical bytes (contract 2)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def at_of_ms(ms: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime, exactly (no float rounding)."""
    return datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=(ms % 1000) * 1000)


def trace_id(traceparent: str) -> str | None:
    found = _TRACEPARENT.fullmatch(traceparent or "")
    return found.group(1) if found and found.group(1) != _NO_TRACE else None


def text(value: Any) -> str:
    return value if type(value) is str else ""


def as_int(value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool):
        return int(value)
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def column(value: str | None, size: int) -> str | None:
    """A copy of a leaf field for a search column: bounded, without NUL (the leaf keeps it whole)."""
    return None if value is None else value.replace("\x00", "")[:size]


def decision_doc(
    event: dict[str, Any], subject: str | None, output_sha256: str, kept: bool, at: datetime | None = None
) -> dict[str, Any]:
    """The decision leaf (contract 2) of a producer's event; ``subject`` is the pseudonym, ``at``
    the event's time (default: its ``at`` member)."""
    get = event.get
    latency, consents, jurisdiction = get("latency_ms"), get("consents"), get("jurisdiction")
    return {
        "v": 1,
        "kind": "decision",
        "id": text(get("id")),
        "at": iso_utc(at if at is not None else at_of_ms(as_int(get("at")))),
        "tenant": text(get("tenant")),
        "key": text(get("key")),
        "subject": subject,
        "model": text(get("model")),
        "version": as_int(get("version")),
        "artifact": text(get("artifact")),
        "role": text(get("role")),
        "cache": get("cache") is True,
        "rule": text(get("rule")),
        "trace": trace_id(text(get("tp"))),
        "request_id": text(get("rid")),
        "input_sha256": text(get("input_sha256")),
        "output_sha256": output_sha256,
        "latency_ms": round(float(latency), 3) if isinstance(latency, int | float) and latency == latency else 0.0,
        "jurisdiction": jurisdiction if isinstance(jurisdiction, str) and jurisdiction else None,
        "consents": sorted(c for c in consents if isinstance(c, str)) if isinstance(consents, list) else [],
        "rows": as_int(get("rows")),
        "payload": "encrypted" if kept else "none",
        **_guards(get("guards")),
    }


_GUARD_MEMBERS = 16  # results kept per decision (a text request runs at most a handful of guards)


def _guards(found: Any) -> dict[str, Any]:
    """The guard results of a text decision, bounded and typed (no text: names, decisions,
    latencies, counts, rule ids); nothing for a decision no guard looked at (so the leaves of
    tensor models are as before)."""
    if not isinstance(found, list) or not found:
        return {}
    kept = []
    for item in found[:_GUARD_MEMBERS]:
        if not isinstance(item, dict):
            continue
        counts = item.get("counts")
        rules = item.get("rules")
        kept.append(
            {
                "guard": column(text(item.get("guard")), 32),
                "decision": column(text(item.get("decision")), 16),
                "latency_us": as_int(item.get("latency_us")),
                "counts": {str(k)[:32]: as_int(v) for k, v in list(counts.items())[:32] if isinstance(v, int)}
                if isinstance(counts, dict)
                else {},
                "rules": [column(r, 64) for r in rules[:32] if isinstance(r, str)] if isinstance(rules, list) else [],
            }
        )
    return {"guards": kept} if kept else {}


def admin_doc(row: AdminChange) -> dict[str, Any]:
    """The admin (or, for ``subject.erase``, erasure) leaf of an ``admin_changes`` row."""
    detail = dict(row.detail or {})
    doc: dict[str, Any] = {"v": 1, "id": f"admin-{row.id}", "at": iso_utc(row.at), "principal": row.principal_id}
    for name in _LIFTED:
        if name in detail:
            doc[name] = detail.pop(name)
    if row.action == ERASE_ACTION:
        doc.update(
            kind="erasure",
            action=row.action,
            tenant=text(detail.pop("tenant", "")),
            subject=text(detail.pop("subject", "")) or None,
            keys_destroyed=as_int(detail.pop("keys_destroyed", 0)),
        )
    else:
        doc.update(kind="admin", action=row.action, resource={"kind": row.resource_kind, "name": row.resource_name})
    doc["detail"] = detail
    return doc


def admin_leaf(row: AdminChange) -> Leaf:
    doc = admin_doc(row)
    at = row.at if row.at.tzinfo is not None else row.at.replace(tzinfo=UTC)
    return Leaf(
        event_id=doc["id"],
        kind=doc["kind"],
        at=at,
        tenant=doc.get("tenant"),
        subject=doc.get("subject"),
        model=None,
        version=None,
        body=canonical(doc),
    )


def pack_payload(inputs: bytes | None, outputs: bytes) -> bytes:
    head = struct.pack(">I", len(inputs)) if inputs is not None else struct.pack(">I", 0xFFFFFFFF)
    return head + (inputs or b"") + outputs


def unpack_payload(data: bytes) -> tuple[bytes | None, bytes]:
    (n,) = struct.unpack(">I", data[:4])
    if n == 0xFFFFFFFF:
        return None, data[4:]
    return data[4 : 4 + n], data[4 + n :]


def decision_leaf(decision: Decision, pseudonym: Callable[[str, str], str | None]) -> Leaf:
    """The leaf of one stream entry; ``pseudonym(tenant, subject digest)`` names its subject. An
    id our producers never write is replaced by a safe one derived from the entry (logged)."""
    event = decision.event
    event_id = text(event.get("id"))
    if not EVENT_ID.fullmatch(event_id):  # not an id our producers write: keep the evidence, under a safe id
        event_id = "malformed-" + (decision.entry_id or sha256(orjson.dumps(event)).hexdigest())[:50]
        event = {**event, "id": event_id}
        log.error("audit_event_malformed", entry_id=decision.entry_id)
    at_ms = as_int(event.get("at")) or as_int(decision.entry_id.partition("-")[0])
    at = at_of_ms(at_ms)
    tenant = text(event.get("tenant"))
    subject = pseudonym(tenant, text(event.get("subj")))
    kept = event.get("retain") is True
    doc = decision_doc(event, subject, sha256(decision.outputs).hexdigest(), kept, at)
    owner = None
    if kept:
        named = subject or pseudonym(tenant, subject_digest(tenant, key_subject(doc["key"])))
        owner = (tenant, named or "", at_ms // DAY_MS)
    return Leaf(
        event_id=event_id,
        kind="decision",
        at=at,
        tenant=tenant,
        subject=subject,
        model=doc["model"],
        version=doc["version"],
        body=canonical(doc),
        sealed=pack_payload(decision.inputs, decision.outputs) if kept else None,
        owner=owner,
    )


def search_columns(doc: dict[str, Any]) -> dict[str, Any]:
    """The searchable columns a leaf row holds for ``doc`` (its parsed body), as appended: what
    ``verify`` holds each row's columns to. Times to the millisecond, as the body has them."""
    decision = doc.get("kind") == "decision"
    tenant, subject = doc.get("tenant"), doc.get("subject")
    return {
        "event_id": doc.get("id"),
        "kind": doc.get("kind"),
        "at": doc.get("at"),
        "tenant": column(tenant if isinstance(tenant, str) else None, 128),
        "subject": column(subject if isinstance(subject, str) else None, 64),
        "model": column(text(doc.get("model")), 128) if decision else None,
        "version": doc.get("version") if decision else None,
    }
