"""The decision log on real SQL (SQLite and PostgreSQL) and a real Redis: appending once per id,
one appender at a time, proofs, verification, the stream consumer's at-least-once delivery, and
payloads sealed per subject and shredded by erasure or retention."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydantic import SecretStr
from sqlalchemy import Engine, select, text

from bastion import codec, metrics
from bastion.artifacts.store import ArtifactStore
from bastion.audit import crypto, merkle, tables
from bastion.audit.consumer import AuditConsumer
from bastion.audit.leaves import Decision, admin_doc, canonical
from bastion.audit.log import AuditLog
from bastion.audit.service import AuditService, signer_from
from bastion.audit.signing import verify_signature
from bastion.constants import AUDIT_CHECKPOINT_KEY, AUDIT_GROUP, AUDIT_STREAM
from bastion.errors import Conflict, InvalidInput, NotFound
from bastion.registry import db
from bastion.registry.service import Registry
from bastion.registry.tables import AdminChange, Base
from bastion.settings import Settings

DAY_S = 86_400


@dataclass
class Audit:
    service: AuditService
    registry: Registry
    engine: Engine
    settings: Settings

    @property
    def log(self) -> AuditLog:
        return self.service.log


def _service(settings: Settings, engine: Engine, client: redis.Redis) -> tuple[AuditService, Registry]:
    sessions = db.Sessions(db.session_factory(engine))
    registry = Registry(sessions, ArtifactStore(settings.data_dir / "artifacts"), max_upload_bytes=1 << 20)
    return AuditService(settings, sessions, engine, client), registry


@pytest.fixture
def audit(database_url: str, redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[Audit]:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url=redis_url)
    engine = db.engine_for(database_url)
    db.migrate(engine)
    service, registry = _service(settings, engine, redis_client)
    service.start()
    registry.set_tenant("acme", None, retain_payloads_s=30 * DAY_S)
    registry.set_tenant("globex", None)
    yield Audit(service, registry, engine, settings)
    engine.dispose()


def tensors(*values: float) -> bytes:
    return codec.encode({"input": np.array([values], dtype=np.float32)})


def outputs(label: int) -> bytes:
    return codec.encode({"label": np.array([label], dtype=np.int64), "probabilities": np.array([[0.25, 0.75]])})


def event(
    i: int, *, tenant: str = "acme", subject: str = "", retain: bool = False, at_ms: int | None = None
) -> dict[str, Any]:
    """A producer's event (contract 1) for decision ``i``; ``subject`` is named in clear here and
    digested as the gateway does."""
    return {
        "id": f"job-{i:06d}",
        "kind": "decision",
        "at": at_ms if at_ms is not None else int(time.time() * 1000),
        "tenant": tenant,
        "key": "k1",
        "subj": crypto.subject_digest(tenant, subject) if subject else "",
        "model": "breast-cancer",
        "version": 1,
        "artifact": "ab" * 32,
        "role": "primary",
        "cache": False,
        "rule": "",
        "tp": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "rid": f"req-{i}",
        "input_sha256": hashlib.sha256(tensors(i)).hexdigest(),
        "latency_ms": 1.5,
        "jurisdiction": "EU",
        "consents": ["marketing"],
        "rows": 1,
        "retain": retain,
    }


def decision(i: int, **kwargs: Any) -> Decision:
    ev = event(i, **kwargs)
    return Decision(ev, outputs(i % 2), tensors(float(i), 1234.5) if ev["retain"] else None)


def xadd(client: redis.Redis, i: int, **kwargs: Any) -> None:
    ev = event(i, **kwargs)
    fields: dict[str, bytes] = {"e": orjson.dumps(ev), "o": outputs(i % 2)}
    if ev["retain"]:
        fields["i"] = tensors(float(i), 1234.5)
    client.xadd(AUDIT_STREAM, fields)  # type: ignore[arg-type]


def positions_and_ids(log: AuditLog) -> tuple[list[int], list[str]]:
    rows = list(log.leaves())
    return [p for p, _, _ in rows], [orjson.loads(body)["id"] for _, body, _ in rows]


# schema ------------------------------------------------------------------------------------
def test_migration_0009_matches_the_audit_tables(database_url: str) -> None:
    engine = db.engine_for(database_url)
    db.migrate(engine)
    assert tables.AuditLeaf.__table__.metadata is Base.metadata  # one metadata with the registry
    audit_tables = {name for name in Base.metadata.tables if name.startswith("audit_")}
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    ours = [d for d in diff if "audit_" in repr(d)]
    assert ours == [], ours
    with engine.connect() as conn:
        assert conn.execute(text("SELECT size, admin_through FROM audit_head WHERE id = 1")).one() == (0, 0)
    assert len(audit_tables) == 8
    engine.dispose()


# appending ---------------------------------------------------------------------------------
def test_append_is_idempotent_by_event_id_and_positions_are_contiguous(audit: Audit) -> None:
    first = audit.log.append([decision(i) for i in range(5)] + [decision(2)])  # a repeat inside the batch
    assert (first.appended, first.skipped) == (5, 1)
    again = audit.log.append([decision(i) for i in range(3, 8)])
    assert (again.appended, again.skipped) == (3, 2)
    positions, ids = positions_and_ids(audit.log)
    assert positions == list(range(8))
    assert ids == [f"job-{i:06d}" for i in range(8)]
    assert audit.log.size() == 8


def test_a_leaf_is_the_canonical_document_of_contract_2(audit: Audit) -> None:
    audit.log.append([decision(1, subject="alice")])
    found = audit.log.get("job-000001")
    leaf = found["leaf"]
    assert leaf["subject"] == audit.service.pseudonym("acme", "alice") and len(leaf["subject"]) == 64
    assert leaf["trace"] == "1" * 32 and leaf["request_id"] == "req-1" and leaf["payload"] == "none"
    assert leaf["output_sha256"] == hashlib.sha256(outputs(1)).hexdigest()
    assert leaf["at"].endswith("Z") and leaf["consents"] == ["marketing"] and leaf["jurisdiction"] == "EU"
    body = canonical(leaf)
    assert found["leaf_hash"] == merkle.leaf_hash(body).hex()
    assert "alice" not in body.decode()
    with pytest.raises(NotFound):
        audit.log.get("no-such-event")


def test_two_appenders_never_assign_one_position(audit: Audit, redis_client: redis.Redis) -> None:
    """Two control-plane replicas (each its own engine and AuditLog) appending the same and
    different events at once: every id once, positions 0..n-1, the tree verifies."""
    engine = db.engine_for(audit.settings.resolved_database_url)
    other, _ = _service(audit.settings, engine, redis_client)
    errors: list[BaseException] = []

    def run(log: AuditLog, offset: int) -> None:
        try:
            for batch in range(10):
                shared = [decision(1000 + batch * 5 + j) for j in range(5)]  # both replicas see these
                own = [decision(offset + batch * 5 + j) for j in range(5)]
                log.append(shared + own)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(log, off)) for log, off in ((audit.log, 0), (other.log, 500))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    positions, ids = positions_and_ids(audit.log)
    assert len(ids) == len(set(ids)) == 150
    assert positions == list(range(150))
    audit.log.checkpoint()
    assert audit.log.verify().ok
    engine.dispose()


def test_admin_changes_are_logged_with_their_principal(audit: Audit) -> None:
    with audit.registry.unit():
        audit.registry.set_tenant("initech", "EU")
        audit.registry.trail.append(
            "op-1", "tenant.set", "tenant", "initech", {"jurisdiction": "EU", "route": "PUT /admin/v1/tenants/initech"}
        )
    audit.log.append([decision(1)])
    items, _ = audit.log.search(kind="admin")
    [admin] = items
    assert admin["leaf"]["principal"] == "op-1" and admin["leaf"]["action"] == "tenant.set"
    assert admin["leaf"]["route"] == "PUT /admin/v1/tenants/initech"
    assert admin["leaf"]["resource"] == {"kind": "tenant", "name": "initech"}
    assert audit.log.append().appended == 0  # nothing new: nothing appended


def test_an_admin_change_without_stream_traffic_is_still_logged(audit: Audit) -> None:
    with audit.registry.unit():
        audit.registry.trail.append("op-2", "key.revoke", "key", "abc", {})
    done = audit.service.consume_once(block_ms=1)
    assert done == 1 and audit.log.search(kind="admin")[0][0]["leaf"]["principal"] == "op-2"


def test_erasure_changes_become_erasure_leaves_without_the_subject() -> None:
    change = AdminChange(
        id=7,
        principal_id="op",
        action="subject.erase",
        resource_kind="subject",
        resource_name="p" * 64,
        detail={"tenant": "acme", "subject": "p" * 64, "keys_destroyed": 3, "decisions": 2},
    )
    change.at = datetime(2030, 1, 1)
    doc = admin_doc(change)
    assert doc["kind"] == "erasure" and doc["subject"] == "p" * 64 and doc["keys_destroyed"] == 3
    assert doc["id"] == "admin-7" and doc["at"] == "2030-01-01T00:00:00.000Z" and doc["detail"] == {"decisions": 2}


# search ------------------------------------------------------------------------------------
def test_search_pages_by_position_with_every_filter(audit: Audit) -> None:
    audit.log.append([decision(i, subject="alice" if i % 2 else "bob") for i in range(10)])
    audit.log.append([decision(100, tenant="globex", subject="alice")])
    alice = audit.service.pseudonym("acme", "alice")
    page, cursor = audit.log.search(tenant="acme", pseudonym=alice, limit=3)
    assert [p["leaf"]["id"] for p in page] == ["job-000001", "job-000003", "job-000005"] and cursor is not None
    rest, end = audit.log.search(tenant="acme", pseudonym=alice, after=cursor, limit=3)
    assert [p["leaf"]["id"] for p in rest] == ["job-000007", "job-000009"] and end is None
    assert audit.service.pseudonym("globex", "alice") != alice
    assert len(audit.log.search(tenant="globex")[0]) == 1
    assert len(audit.log.search(tenant="acme", model="breast-cancer", version=1, limit=1000)[0]) == 10
    assert audit.log.search(tenant="acme", model="breast-cancer", version=2)[0] == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"kind": "nope"}, {"pseudonym": alice}, {"version": 1}):
        with pytest.raises(InvalidInput):
            audit.log.search(**bad)  # type: ignore[arg-type]


# proofs and verification -------------------------------------------------------------------
def test_inclusion_and_consistency_proofs_verify_against_signed_checkpoints(audit: Audit) -> None:
    audit.log.append([decision(i) for i in range(7)])
    first = audit.log.checkpoint()
    audit.log.append([decision(i) for i in range(7, 21)])
    second = audit.log.checkpoint()
    assert first is not None and second is not None and (first.size, second.size) == (7, 21)
    assert audit.log.checkpoint() is None  # nothing new
    keys = audit.log.public_keys()
    for cp in (first, second):
        assert verify_signature(keys[cp.key_id], cp.message(), cp.signature)
    for i in range(21):
        proof = audit.log.inclusion(f"job-{i:06d}")
        assert proof["size"] == 21 and proof["checkpoint"]["signature"] == second.signature.hex()
        assert merkle.verify_inclusion(
            bytes.fromhex(proof["leaf_hash"]),
            proof["position"],
            21,
            [bytes.fromhex(h) for h in proof["proof"]],
            second.root,
        )
    old = audit.log.inclusion("job-000003", size=7)
    assert merkle.verify_inclusion(
        bytes.fromhex(old["leaf_hash"]), 3, 7, [bytes.fromhex(h) for h in old["proof"]], first.root
    )
    consistency = audit.log.consistency(7, 21)
    assert merkle.verify_consistency(7, 21, first.root, second.root, [bytes.fromhex(h) for h in consistency["proof"]])
    with pytest.raises(InvalidInput):
        audit.log.inclusion("job-000010", size=7)
    with pytest.raises(InvalidInput):
        audit.log.consistency(0, 21)
    with pytest.raises(InvalidInput):
        audit.log.consistency(7, 22)
    audit.log.append([decision(99)])
    with pytest.raises(Conflict):
        audit.log.inclusion("job-000099")  # not under a checkpoint yet


def test_verify_passes_and_names_the_first_edited_position(audit: Audit) -> None:
    audit.log.append([decision(i, retain=True, subject="carol") for i in range(12)])
    audit.log.checkpoint()
    audit.log.append([decision(i) for i in range(12, 20)])
    audit.log.checkpoint()
    report = audit.log.verify()
    assert report.ok and report.size == 20 and report.checkpoints_checked == 2
    assert audit.log.verify(start=5, end=12).ok
    assert audit.log.verify(start=12).ok
    page = audit.log.leaves_page(12, 3)
    assert [p for p, _, _ in page] == [12, 13, 14] and len(audit.log.frontier_at(12)) == 2
    before = metrics.AUDIT_VERIFY_FAILURES._value.get()
    with audit.engine.begin() as conn:  # an edit nothing in Bastion would make
        body = conn.execute(text("SELECT body FROM audit_leaves WHERE position = 9")).scalar_one()
        conn.execute(
            text("UPDATE audit_leaves SET body = :b WHERE position = 9"),
            {"b": bytes(body).replace(b'"rows":1', b'"rows":2')},
        )
    broken = audit.log.verify()
    assert not broken.ok and broken.findings[0].position == 9
    assert metrics.AUDIT_VERIFY_FAILURES._value.get() == before + 1


def test_verify_finds_a_search_column_edited_without_its_leaf(audit: Audit) -> None:
    """The tree covers bodies only: a forger could move an event out of a tenant's search by
    editing its columns; verify holds every row's columns to its body and names the position."""
    audit.log.append([decision(i, subject="alice") for i in range(4)])
    audit.log.checkpoint()
    assert audit.log.verify().ok
    with audit.engine.begin() as conn:
        conn.execute(text("UPDATE audit_leaves SET tenant = 'globex', subject = NULL WHERE position = 2"))
    report = audit.log.verify()
    assert not report.ok
    assert [(f.position, f.what) for f in report.findings] == [
        (2, "searchable columns differ from the leaf: tenant, subject")
    ]


def test_checkpoints_are_published_to_redis(audit: Audit, redis_client: redis.Redis) -> None:
    audit.log.append([decision(i) for i in range(3)])
    cp = audit.log.checkpoint()
    assert cp is not None
    published = orjson.loads(redis_client.get(AUDIT_CHECKPOINT_KEY) or b"{}")
    assert published["size"] == 3 and published["root"] == cp.root.hex()
    assert published["public_key"] == audit.service.signer.public_raw.hex()
    audit.log.publish({**published, "size": 2})  # type: ignore[misc]  # an older one never replaces it
    assert orjson.loads(redis_client.get(AUDIT_CHECKPOINT_KEY) or b"{}")["size"] == 3


# the consumer ------------------------------------------------------------------------------
def test_the_consumer_logs_the_stream_then_acknowledges_and_deletes(audit: Audit, redis_client: redis.Redis) -> None:
    for i in range(25):
        xadd(redis_client, i)
    consumer = AuditConsumer(redis_client, audit.log, batch=10)
    total = 0
    while total < 25:
        total += consumer.poll(block_ms=10).appended
    assert redis_client.xlen(AUDIT_STREAM) == 0
    assert redis_client.xpending(AUDIT_STREAM, AUDIT_GROUP)["pending"] == 0
    assert positions_and_ids(audit.log)[1] == [f"job-{i:06d}" for i in range(25)]
    consumer.measure(force=True)
    assert metrics.AUDIT_BACKLOG._value.get() == 0


def test_a_crash_between_commit_and_ack_replays_without_duplicates(audit: Audit, redis_client: redis.Redis) -> None:
    for i in range(8):
        xadd(redis_client, i)
    crashed = AuditConsumer(redis_client, audit.log, batch=100, name="replica-a")
    entries = crashed._read(None)
    assert len(entries) == 8
    crashed.log.append([Decision(orjson.loads(f[b"e"]), f[b"o"]) for _, f in entries])  # committed...
    # ... and the process died before XACK/XDEL: the entries are pending under its name.
    assert redis_client.xpending(AUDIT_STREAM, AUDIT_GROUP)["pending"] == 8
    xadd(redis_client, 8)
    survivor = AuditConsumer(redis_client, audit.log, batch=100, name="replica-b", claim_idle_ms=0)
    claimed = survivor.poll(block_ms=10)
    assert claimed.appended == 0 and claimed.skipped == 8  # claimed from the dead one, all logged already
    assert survivor.poll(block_ms=10).appended == 1
    assert redis_client.xlen(AUDIT_STREAM) == 0
    assert redis_client.xpending(AUDIT_STREAM, AUDIT_GROUP)["pending"] == 0
    positions, ids = positions_and_ids(audit.log)
    assert ids == [f"job-{i:06d}" for i in range(9)] and positions == list(range(9))
    assert survivor.expire_consumers(0) == 1  # the dead replica's name goes (nothing pending)


def test_a_failed_append_is_retried_and_nothing_is_acknowledged_before(audit: Audit, redis_client: redis.Redis) -> None:
    xadd(redis_client, 1)
    consumer = AuditConsumer(redis_client, audit.log, batch=10)
    with audit.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_head"))  # the database is broken for a moment
    with pytest.raises(Exception, match="head row"):
        consumer.poll(block_ms=10)
    assert redis_client.xlen(AUDIT_STREAM) == 1
    with audit.engine.begin() as conn:
        conn.execute(text("INSERT INTO audit_head (id, size, admin_through) VALUES (1, 0, 0)"))
    assert consumer.poll(block_ms=10).appended == 1
    assert redis_client.xlen(AUDIT_STREAM) == 0


def test_a_failed_append_keeps_the_batch_read_ahead_too(audit: Audit, redis_client: redis.Redis) -> None:
    """A full batch makes the consumer read the next one while it appends; when the append
    fails, both are retried, in stream order, and nothing is acknowledged before its commit."""
    for i in range(25):
        xadd(redis_client, i)
    consumer = AuditConsumer(redis_client, audit.log, batch=10)
    with audit.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_head"))
    with pytest.raises(Exception, match="head row"):
        consumer.poll(block_ms=10)
    assert redis_client.xlen(AUDIT_STREAM) == 25
    assert redis_client.xpending(AUDIT_STREAM, AUDIT_GROUP)["pending"] == 20  # this batch and the next
    with audit.engine.begin() as conn:
        conn.execute(text("INSERT INTO audit_head (id, size, admin_through) VALUES (1, 0, 0)"))
    total = 0
    while total < 25:
        total += consumer.poll(block_ms=10).appended
    consumer.close()
    assert redis_client.xlen(AUDIT_STREAM) == 0
    positions, ids = positions_and_ids(audit.log)
    assert ids == [f"job-{i:06d}" for i in range(25)] and positions == list(range(25))


def test_search_by_time_reads_the_stored_times(audit: Audit) -> None:
    """Leaves are inserted below the ORM: their ``at`` column still compares as SQLAlchemy binds times."""
    base = 1_780_000_000_000
    audit.log.append([decision(i, at_ms=base + i * 1000) for i in range(5)])
    since, until = datetime.fromtimestamp((base + 1000) / 1000, UTC), datetime.fromtimestamp((base + 3000) / 1000, UTC)
    items, _ = audit.log.search(kind="decision", since=since, until=until)
    assert [item["leaf"]["id"] for item in items] == ["job-000001", "job-000002"]


def test_a_malformed_entry_is_kept_as_evidence_under_a_safe_id(audit: Audit, redis_client: redis.Redis) -> None:
    redis_client.xadd(AUDIT_STREAM, {"e": b"not json", "o": b""})
    consumer = AuditConsumer(redis_client, audit.log, batch=10)
    assert consumer.poll(block_ms=10).appended == 1
    [(_, body, _)] = list(audit.log.leaves())
    assert orjson.loads(body)["id"].startswith("malformed-")


def test_the_consumer_lag_is_the_age_of_the_oldest_waiting_entry(audit: Audit, redis_client: redis.Redis) -> None:
    consumer = AuditConsumer(redis_client, audit.log, batch=10)
    assert consumer.lag_s() == 0.0
    seconds, _ = redis_client.time()
    redis_client.xadd(AUDIT_STREAM, {"e": b"{}", "o": b""}, id=f"{(int(seconds) - 5) * 1000}-0")
    assert 4.5 < consumer.lag_s() < 10


# payloads ----------------------------------------------------------------------------------
def test_kept_payloads_round_trip_and_are_never_stored_in_clear(audit: Audit, redis_client: redis.Redis) -> None:
    xadd(redis_client, 1, subject="dave", retain=True)
    xadd(redis_client, 2, retain=False)
    xadd(redis_client, 3, retain=True)  # no named subject: sealed under the caller's key
    AuditConsumer(redis_client, audit.log, batch=10).poll(block_ms=10)
    kept = audit.log.payload("job-000001")
    assert kept["state"] == "kept"
    assert kept["inputs"] == {"input": [[1.0, 1234.5]]} and kept["outputs"]["label"] == [1]
    assert audit.log.payload("job-000002") == {"state": "none"}
    assert audit.log.payload("job-000003")["inputs"] == {"input": [[3.0, 1234.5]]}
    assert audit.log.get("job-000001")["leaf"]["payload"] == "encrypted"
    plain = tensors(1.0, 1234.5)
    with audit.engine.connect() as conn:
        for table in ("audit_payloads", "audit_leaves", "audit_data_keys", "audit_tenant_secrets"):
            for row in conn.execute(text(f"SELECT * FROM {table}")):  # noqa: S608 - fixed names
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        assert plain[-8:] not in bytes(value) and b"dave" not in bytes(value)
                    assert "dave" not in str(value)


def test_a_payload_sealed_for_one_event_does_not_open_for_another(audit: Audit) -> None:
    audit.log.append([decision(1, retain=True, subject="erin"), decision(2, retain=True, subject="erin")])
    with audit.engine.begin() as conn:
        one = conn.execute(text("SELECT nonce, ciphertext FROM audit_payloads WHERE event_id = 'job-000001'")).one()
        conn.execute(
            text("UPDATE audit_payloads SET nonce = :n, ciphertext = :c WHERE event_id = 'job-000002'"),
            {"n": one[0], "c": one[1]},
        )
    assert audit.log.payload("job-000002") == {"state": "unreadable"}


def test_erased_payloads_are_unreadable_and_the_log_still_verifies(audit: Audit, redis_client: redis.Redis) -> None:
    for i in range(4):
        xadd(redis_client, i, subject="frank" if i < 2 else "grace", retain=True)
    report = audit.service.subjects.erase("acme", "frank", "op-9")  # drains the stream first
    assert report["decisions"] == 2 and report["keys_destroyed"] == 1 and report["drained"] == 4
    assert report["aof_rewritten"] and report["rdb_saved"]
    assert audit.log.payload("job-000000") == {"state": "erased"}
    assert audit.log.payload("job-000001") == {"state": "erased"}
    assert audit.log.payload("job-000002")["state"] == "kept"
    frank = audit.service.pseudonym("acme", "frank")
    [erasure] = audit.log.search(kind="erasure")[0]
    assert erasure["leaf"]["subject"] == frank and erasure["leaf"]["principal"] == "op-9"
    assert erasure["leaf"]["id"] == report["event_id"] and "frank" not in orjson.dumps(erasure).decode()
    audit.log.checkpoint()
    assert audit.log.verify().ok
    with audit.engine.connect() as conn:
        left = conn.execute(select(tables.AuditDataKey.pseudonym)).scalars().all()
    assert frank not in left
    again = audit.service.subjects.erase("acme", "frank", "op-9")
    assert again["keys_destroyed"] == 0


def test_a_decision_after_the_erasure_gets_a_new_key(audit: Audit) -> None:
    audit.log.append([decision(1, retain=True, subject="heidi")])
    audit.service.subjects.erase("acme", "heidi", "op")
    audit.log.append([decision(2, retain=True, subject="heidi")])
    assert audit.log.payload("job-000001") == {"state": "erased"}
    assert audit.log.payload("job-000002")["state"] == "kept"


def test_retention_destroys_the_keys_of_days_past_it(audit: Audit) -> None:
    now = time.time()
    old = int((now - 40 * DAY_S) * 1000)
    audit.log.append(
        [
            decision(1, retain=True, subject="ivan", at_ms=old),
            decision(2, retain=True, subject="ivan"),
            decision(3, tenant="globex", retain=True, subject="ivan"),  # globex keeps nothing
        ]
    )
    assert audit.log.payload("job-000001") == {"state": "expired"}  # enforced when read, before the sweep
    assert audit.service.retention.sweep(now) == 2
    assert audit.log.payload("job-000001") == {"state": "expired"}
    assert audit.log.payload("job-000002")["state"] == "kept"
    assert audit.log.payload("job-000003") == {"state": "expired"}
    assert audit.service.retention.sweep(now) == 0


# decision outcomes -------------------------------------------------------------------------
def outcome_rows(audit: Audit) -> dict[str, tables.DecisionOutcome]:
    with audit.log.sessions() as s:
        return {r.event_id: r for r in s.scalars(select(tables.DecisionOutcome))}


def test_each_decision_gets_its_outcome_with_its_leaf_whether_or_not_payloads_are_kept(audit: Audit) -> None:
    many = Decision(
        event(4) | {"rows": 3},
        codec.encode({"label": np.array([0, 1, 1], dtype=np.int64), "probabilities": np.full((3, 2), 0.5)}),
    )
    regression = Decision(event(5), codec.encode({"variable": np.array([[12.5]], dtype=np.float32)}))
    broken = Decision(event(6), b"not tensors")
    done = audit.log.append([decision(1), decision(2, retain=True, subject="alice"), many, regression, broken])
    assert done.appended == 5
    found = outcome_rows(audit)
    assert sorted(found) == [f"job-{i:06d}" for i in (1, 2, 4, 5, 6)]
    one = found["job-000001"]  # globex-style: nothing kept, graded all the same
    assert (one.tenant, one.model, one.version, one.role, one.rows) == ("acme", "breast-cancer", 1, "primary", 1)
    assert (one.label, one.score, one.classes, one.value) == (1, 0.75, 2, None)
    assert found["job-000002"].label == 0 and found["job-000002"].subject == audit.service.pseudonym("acme", "alice")
    assert found["job-000001"].subject == audit.service.pseudonym("acme", "key:k1")  # no subject named: its key's
    assert (found["job-000004"].rows, found["job-000004"].label, found["job-000004"].score) == (3, None, None)
    assert (found["job-000005"].label, found["job-000005"].value) == (None, 12.5)
    assert (found["job-000006"].rows, found["job-000006"].label) == (1, None)  # undecodable: evidence kept, no grade
    with audit.log.sessions() as s:
        leaf_at = s.scalar(select(tables.AuditLeaf.at).where(tables.AuditLeaf.event_id == "job-000001"))
    assert leaf_at is not None and _aware(found["job-000001"].at) == _aware(leaf_at)
    again = audit.log.append([decision(1)])  # a redelivery adds no second outcome
    assert again.appended == 0 and len(outcome_rows(audit)) == 5


def test_outcomes_read_outputs_by_the_versions_signature_and_post_processing() -> None:
    from bastion.audit.outcomes import Reading, outcome_of, reading

    signature = {
        "inputs": [],
        "outputs": [
            {"name": "probabilities", "dtype": "float32", "shape": [None, 3]},
            {"name": "label", "dtype": "int64", "shape": [None]},
        ],
    }
    how = reading(signature, {"postprocessing": {"positive_label": 0}})
    assert how == Reading("label", "probabilities", 0, named=True)
    three = codec.encode({"probabilities": np.array([[0.1, 0.7, 0.2]]), "label": np.array([1], dtype=np.int64)})
    top = outcome_of(three, how, 1)  # three classes: the top probability, and how many columns
    assert (top.label, top.classes) == (1, 3) and top.score == pytest.approx(0.7)
    two = codec.encode({"probabilities": np.array([[0.2, 0.8]]), "label": np.array([1], dtype=np.int64)})
    assert outcome_of(two, how, 1).score == pytest.approx(0.2)  # positive label 0: its column
    named = reading(signature, {"postprocessing": {"label_output": "label", "score_output": "probabilities"}})
    assert outcome_of(two, named, 1).score == pytest.approx(0.8)
    assert outcome_of(two, how, 2).label is None and outcome_of(two, how, 2).rows == 2


def test_erasure_deletes_the_subjects_outcomes_and_labels(audit: Audit) -> None:
    from bastion.registry.tables import Feedback

    audit.log.append([decision(1, subject="frank"), decision(2, subject="frank"), decision(3, subject="grace")])
    audit.log.append([decision(4)])  # no subject named: the subject is its key, key:k1
    with audit.log.sessions.begin() as s:
        for i in (1, 3, 4):
            s.add(_label(i))
    report = audit.service.subjects.erase("acme", "frank", "op")
    assert (report["outcomes_deleted"], report["labels_deleted"]) == (2, 1)
    assert sorted(outcome_rows(audit)) == ["job-000003", "job-000004"]
    with audit.log.sessions() as s:
        assert sorted(s.scalars(select(Feedback.prediction_id))) == ["job-000003", "job-000004"]
    [erasure] = audit.log.search(kind="erasure")[0]
    assert erasure["leaf"]["detail"]["outcomes_deleted"] == 2
    keyed = audit.service.subjects.erase("acme", "key:k1", "op")
    assert (keyed["outcomes_deleted"], keyed["labels_deleted"]) == (1, 1)
    assert sorted(outcome_rows(audit)) == ["job-000003"]
    audit.log.checkpoint()
    assert audit.log.verify().ok


def test_retention_deletes_outcomes_and_labels_older_than_the_accuracy_window(audit: Audit) -> None:
    from bastion.registry.tables import Feedback

    now = time.time()
    window = audit.service.retention.outcomes_window_s
    assert window == audit.settings.accuracy_window_s
    old = int((now - window - 60) * 1000)
    audit.log.append([decision(1, at_ms=old), decision(2, at_ms=int((now - window + 3600) * 1000)), decision(3)])
    with audit.log.sessions.begin() as s:
        s.add(_label(1, at=datetime.fromtimestamp(old / 1000, UTC)))
        s.add(_label(3))
    audit.service.retention.sweep(now)
    assert sorted(outcome_rows(audit)) == ["job-000002", "job-000003"]
    with audit.log.sessions() as s:
        assert list(s.scalars(select(Feedback.prediction_id))) == ["job-000003"]


def _label(i: int, at: datetime | None = None) -> Any:
    from bastion.registry.tables import Feedback

    at = at or datetime.now(UTC)
    return Feedback(
        prediction_id=f"job-{i:06d}",
        tenant="acme",
        model="breast-cancer",
        version=1,
        role="primary",
        label=1,
        predicted=1,
        predicted_at=at,
        labelled_at=at,
        replaced=0,
    )


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# keys --------------------------------------------------------------------------------------
def test_production_refuses_to_start_without_its_keys(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, environment="production")
    with pytest.raises(ValueError, match="BASTION_AUDIT_KEK"):
        crypto.provider_from(settings)
    with pytest.raises(ValueError, match="BASTION_AUDIT_SIGNING_KEY_FILE"):
        signer_from(settings)
    assert not (tmp_path / "audit.kek").exists() and not (tmp_path / "audit-signing.pem").exists()


def test_development_creates_private_key_files(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    provider = crypto.provider_from(settings)
    signer = signer_from(settings)
    for path in (settings.resolved_audit_kek_file, settings.resolved_audit_signing_key_file):
        assert path.stat().st_mode & 0o777 == 0o600
    assert crypto.provider_from(settings).key_id == provider.key_id  # read back, not made again
    assert signer_from(settings).key_id == signer.key_id


def test_a_rotated_kek_rewraps_keys_without_touching_payloads(audit: Audit, redis_client: redis.Redis) -> None:
    audit.log.append([decision(1, retain=True, subject="judy")])
    old = audit.settings.resolved_audit_kek_file.read_text().strip()
    new = base64.b64encode(b"\x07" * 32).decode()
    rotated = audit.settings.model_copy(update={"audit_kek": SecretStr(f"{new},{old}")})
    service, _ = _service(rotated, audit.engine, redis_client)
    assert service.keyring.rewrap() == 2  # the tenant secret and the data key
    with audit.engine.connect() as conn:
        assert set(conn.execute(text("SELECT kek_id FROM audit_data_keys")).scalars()) == {
            crypto.kek_id_of(b"\x07" * 32)
        }
    assert service.log.payload("job-000001")["inputs"] == {"input": [[1.0, 1234.5]]}
    only_new = audit.settings.model_copy(update={"audit_kek": SecretStr(new)})
    fresh, _ = _service(only_new, audit.engine, redis_client)
    assert fresh.log.payload("job-000001")["state"] == "kept"  # the old KEK is no longer needed
    assert fresh.pseudonym("acme", "judy") == audit.service.pseudonym("acme", "judy")


def test_a_live_log_whose_latest_checkpoints_were_deleted_does_not_verify(audit: Audit) -> None:
    """Deleting the checkpoints that cover the newest leaves would otherwise leave only an
    'unverified tail': the live log holds at most a checkpoint period past its last one."""
    audit.log.append([decision(i) for i in range(6)])
    audit.log.checkpoint()
    assert audit.log.verify().ok
    audit.log.max_unverified = 3
    with audit.engine.begin() as conn:  # an edit nothing in Bastion would make
        conn.execute(text("DELETE FROM audit_checkpoints"))
    report = audit.log.verify()
    assert not report.ok and report.findings[0].position == 0
    assert "no signed checkpoint" in report.findings[0].what


def test_a_text_decisions_guard_results_reach_its_leaf_bounded_typed_and_without_text() -> None:
    """The gateway's input guards ride in the envelope (``grd``), the worker's output guards on
    the outcome; the event carries both and the leaf keeps them typed and bounded, never text."""
    from bastion.audit.leaves import decision_doc
    from bastion.queue import decisions
    from bastion.queue.envelope import Envelope, Job

    env = Envelope("job-g1", "acme", "demo-chat", 1, "sync", key_id="k1", rows=1, blob=b"x")
    env.guards = [{"guard": "injection", "decision": "flag", "latency_us": 310, "rules": ["ign-prev"]}]
    job = Job.from_entry(
        "q", "1-0", dict(zip(*[iter(f if isinstance(f, bytes) else f.encode() for f in env.fields())] * 2, strict=True))
    )
    assert job.guards == env.guards
    output = [{"guard": "pii_out", "decision": "redact", "latency_us": 42, "counts": {"email": 2}}]
    event = orjson.loads(decisions.event(job, "sha", 1_000, guards=output))
    assert [g["guard"] for g in event["guards"]] == ["injection", "pii_out"]
    hostile = [
        *event["guards"],
        {"guard": "x" * 500, "decision": "block", "latency_us": "9", "counts": {"k": "text"}, "rules": [1, "r"]},
        "not a result",
        *({"guard": "g", "decision": "allow"} for _ in range(40)),
    ]
    leaf = decision_doc({**event, "guards": hostile}, None, "out", False)
    kept = leaf["guards"]
    assert len(kept) == 15  # 16 items looked at, one of them not a result
    assert kept[0] == {"guard": "injection", "decision": "flag", "latency_us": 310, "counts": {}, "rules": ["ign-prev"]}
    assert kept[1]["counts"] == {"email": 2}
    assert kept[2]["guard"] == "x" * 32 and kept[2]["counts"] == {} and kept[2]["rules"] == ["r"]
    assert "guards" not in decision_doc({**event, "guards": []}, None, "out", False)
    assert "guards" not in decision_doc({k: v for k, v in event.items() if k != "guards"}, None, "out", False)
