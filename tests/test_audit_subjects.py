"""Data-subject access (issue 14, done-when 4): ``subjects export`` returns every decision about a
subject, decrypted where kept, and nothing about any other subject - even another tenant's subject
of the same name (each tenant's pseudonyms are keyed by its own secret).

In process on SQLite and PostgreSQL with a real Redis (entries of the ``audit`` stream as the
request path writes them), then end to end through a running stack and the admin API.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import redis

from bastion import codec, demo
from bastion.artifacts.store import ArtifactStore
from bastion.audit import crypto
from bastion.audit.service import AuditService
from bastion.constants import AUDIT_STREAM
from bastion.errors import InvalidInput, NotFound
from bastion.registry import db
from bastion.registry.service import Registry
from bastion.settings import Settings
from tests.support import Stack, running, wait_until

SHARED = "customer-42"  # the same subject string under two tenants
PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"
ROW = orjson.loads(demo.sample_request())["inputs"][0]


@pytest.fixture
def audit(database_url: str, redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[AuditService]:
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, redis_url=redis_url)
    engine = db.engine_for(database_url)
    db.migrate(engine)
    sessions = db.Sessions(db.session_factory(engine))
    registry = Registry(sessions, ArtifactStore(tmp_path / "artifacts"), max_upload_bytes=1 << 20)
    registry.set_tenant("acme", None, retain_payloads_s=86_400)
    registry.set_tenant("globex", None, retain_payloads_s=86_400)
    registry.set_tenant("initech", None)
    service = AuditService(settings, sessions, engine, redis_client)
    service.start()
    yield service
    engine.dispose()


def write(client: redis.Redis, event_id: str, tenant: str, subject: str, value: float) -> None:
    """One decision as complete.lua writes it on the stream (tenant keeps payloads: inputs too)."""
    inputs = codec.encode({"input": np.array([[value, 2.0]], dtype=np.float32)})
    outputs = codec.encode({"label": np.array([1], dtype=np.int64)})
    event = {
        "id": event_id,
        "kind": "decision",
        "at": int(time.time() * 1000),
        "tenant": tenant,
        "key": f"key-{tenant}",
        "subj": crypto.subject_digest(tenant, subject),
        "model": "m",
        "version": 1,
        "artifact": "0" * 64,
        "role": "primary",
        "cache": False,
        "rule": "",
        "tp": "",
        "rid": "r",
        "input_sha256": hashlib.sha256(inputs).hexdigest(),
        "latency_ms": 2.0,
        "jurisdiction": None,
        "consents": [],
        "rows": 1,
        "retain": tenant != "initech",
    }
    fields = {"e": orjson.dumps(event), "o": outputs}
    if event["retain"]:
        fields["i"] = inputs
    client.xadd(AUDIT_STREAM, fields)  # type: ignore[arg-type]


def test_export_returns_every_decision_about_the_subject_and_nothing_else(
    audit: AuditService, redis_client: redis.Redis
) -> None:
    for i in range(5):
        write(redis_client, f"acme-{i}", "acme", SHARED, float(i))
    for i in range(3):
        write(redis_client, f"globex-{i}", "globex", SHARED, 100.0 + i)  # same subject string, other tenant
    write(redis_client, "acme-other", "acme", "customer-43", 50.0)
    write(redis_client, "initech-0", "initech", SHARED, 7.0)  # a tenant that keeps no payloads
    while audit.consumer.poll(block_ms=10).appended:
        pass

    acme = audit.subjects.export("acme", SHARED)
    assert [d["event"]["id"] for d in acme] == [f"acme-{i}" for i in range(5)]
    assert [d["payload"]["inputs"]["input"][0][0] for d in acme] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(d["payload"]["state"] == "kept" and d["event"]["tenant"] == "acme" for d in acme)
    assert len({d["event"]["subject"] for d in acme}) == 1

    globex = audit.subjects.export("globex", SHARED)
    assert [d["event"]["id"] for d in globex] == [f"globex-{i}" for i in range(3)]
    assert globex[0]["event"]["subject"] != acme[0]["event"]["subject"]  # unrelated pseudonyms

    [initech] = audit.subjects.export("initech", SHARED)
    assert initech["payload"] == {"state": "none"}
    assert audit.subjects.export("acme", "customer-44") == []  # no decision about them
    assert "customer-42" not in orjson.dumps(acme).decode()  # the report names the subject by pseudonym only


def test_export_after_erasure_lists_the_decisions_with_their_payloads_erased(
    audit: AuditService, redis_client: redis.Redis
) -> None:
    for i in range(2):
        write(redis_client, f"acme-{i}", "acme", SHARED, float(i))
        write(redis_client, f"globex-{i}", "globex", SHARED, float(i))
    audit.subjects.erase("acme", SHARED, "op")  # logs what the stream holds first
    assert [d["payload"] for d in audit.subjects.export("acme", SHARED)] == [{"state": "erased"}] * 2
    assert [d["payload"]["state"] for d in audit.subjects.export("globex", SHARED)] == ["kept"] * 2


def test_bad_subject_requests_are_refused(audit: AuditService) -> None:
    with pytest.raises(NotFound):
        audit.subjects.export("no-such-tenant", SHARED)
    with pytest.raises(NotFound):
        audit.subjects.erase("no-such-tenant", SHARED, "op")
    for bad in ("", "x" * 257):
        with pytest.raises(InvalidInput):
            audit.subjects.export("acme", bad)


# end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("subjects"), workers=1) as s:
        yield s


def _keep_payloads(stack: Stack) -> None:
    engine = db.engine_for(stack.settings.resolved_database_url)
    try:
        registry = Registry(db.session_factory(engine), ArtifactStore(stack.root / "art"), max_upload_bytes=1 << 20)
        for tenant in ("acme", "globex"):
            registry.set_tenant(tenant, None, retain_payloads_s=86_400)
    finally:
        engine.dispose()
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
        assert http.post("/admin/v1/snapshot").status_code == 200
    wait_until(lambda: stack.published_snapshot().count(b'"retain_payloads":true') >= 2, 10, "retention published")


@pytest.mark.slow
def test_subjects_export_through_the_admin_api_keeps_two_tenants_apart(stack: Stack) -> None:
    _keep_payloads(stack)
    ids: dict[str, list[str]] = {"acme": [], "globex": []}
    for tenant in ("acme", "globex"):
        with stack.client(f"{tenant}-subjects", headers={"X-Bastion-Subject": SHARED}) as http:
            for i in range(3 if tenant == "acme" else 2):
                r = http.post(PREDICT, json={"inputs": [[float(i + 1), *ROW[1:]]]})
                assert r.status_code == 200, r.text
                ids[tenant].append(r.json()["id"])
    with stack.client("acme-subjects", headers={"X-Bastion-Subject": "someone-else"}) as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
    rc = stack.redis_client()
    wait_until(lambda: rc.xlen(AUDIT_STREAM) == 0, 30, "the decision log to catch up")
    rc.close()
    with httpx.Client(
        base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=60
    ) as http:
        for tenant in ("acme", "globex"):
            r = http.post(f"/admin/v1/tenants/{tenant}/subjects/export", json={"subject": SHARED})
            assert r.status_code == 200, r.text
            decisions = r.json()["decisions"]
            assert [d["event"]["id"] for d in decisions] == ids[tenant]
            assert {d["event"]["tenant"] for d in decisions} == {tenant}
            firsts = [d["payload"]["inputs"]["input"][0][0] for d in decisions]
            assert firsts == [float(i + 1) for i in range(len(ids[tenant]))]
        missing = http.post("/admin/v1/tenants/no-such-tenant/subjects/export", json={"subject": SHARED})
        assert missing.status_code == 404
