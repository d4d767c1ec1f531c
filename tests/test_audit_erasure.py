"""Erasure leaves no trace (issue 14, done-when 3): after a subject is erased, a byte search of the
whole data directory (the SQLite file, Redis's AOF and RDB, every log) and of PostgreSQL
(``pg_dump``) finds neither the subject's id nor its raw input values; its decisions' payloads read
``erased``; its decisions' outcomes (``decision_outcomes``) and the feedback labels sent for them
are deleted; the chain verifies; another subject's payloads, outcomes and labels stay.

A real stack (control plane, gateway, worker, Redis) on SQLite and on PostgreSQL; the subject's
decisions are sync predictions, one with an Idempotency-Key, a response-cache hit and an async job.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from sqlalchemy import select

from bastion import demo
from bastion.artifacts.store import ArtifactStore
from bastion.audit.tables import DecisionOutcome
from bastion.constants import AUDIT_STREAM
from bastion.registry import db
from bastion.registry.service import Registry
from bastion.registry.tables import Feedback
from tests.support import Stack, running, wait_until

PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"
JOBS = f"/v1/models/{demo.MODEL_NAME}/jobs"
BASE_ROW = orjson.loads(demo.sample_request())["inputs"][0]
KEEP_30_DAYS = 30 * 86_400


def row(marker: float) -> list[float]:
    """The sample row with two features set to values nothing else in the system holds."""
    values = list(BASE_ROW)
    values[0], values[1] = marker, marker + 0.5
    return values


def raw(values: list[float]) -> list[bytes]:
    """What the input looks like wherever it could lie in bytes: the row as float32 tensor bytes
    (the codec's form in Redis), the two marked features' bytes, and their text."""
    tensor = np.asarray(values, dtype=np.float32).tobytes()
    return [tensor, tensor[:8], repr(values[0]).encode(), repr(values[1]).encode()]


def keep_payloads(stack: Stack, tenant: str) -> None:
    """Set the tenant's payload retention (in the registry the control plane reads) and publish."""
    engine = db.engine_for(stack.settings.resolved_database_url)
    try:
        registry = Registry(
            db.session_factory(engine), ArtifactStore(stack.root / "artifacts"), max_upload_bytes=1 << 20
        )
        registry.set_tenant(tenant, None, retain_payloads_s=KEEP_30_DAYS)
    finally:
        engine.dispose()
    with admin_http(stack) as http:
        assert http.post("/admin/v1/snapshot").status_code == 200
    wait_until(lambda: b'"retain_payloads":true' in stack.published_snapshot(), 10, "the retention to be published")


def admin_http(stack: Stack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=120.0
    )


def decide(stack: Stack, subject: str, marker: float) -> list[str]:
    """Decisions about ``subject``: two predictions, one with an Idempotency-Key, a cache hit and
    an async job; their ids."""
    headers = {"X-Bastion-Subject": subject}
    ids = []
    with stack.client("acme-subjects", headers=headers) as http:
        for i in range(2):
            r = http.post(PREDICT, json={"inputs": [row(marker + i)]})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        r = http.post(PREDICT, json={"inputs": [row(marker + 2)]}, headers={"Idempotency-Key": f"k-{marker}"})
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
        for _ in range(2):  # the second is answered from the cache: a decision of its own
            r = http.post(PREDICT, json={"inputs": [row(marker + 3)]})
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        job = http.post(JOBS, json={"inputs": [row(marker + 4)]}).json()
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 30, "the async job")
        ids.append(job["id"])
    return ids


def event(stack: Stack, event_id: str) -> dict[str, Any]:
    with admin_http(stack) as http:
        r = http.get(f"/admin/v1/audit/events/{event_id}")
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()
    return found


def occurrences(blob: bytes, needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if n in blob]


def scan_directory(root: Path, needles: list[bytes]) -> dict[str, list[bytes]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            hits = occurrences(path.read_bytes(), needles)
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def label(stack: Stack, key: str, prediction: str) -> None:
    """Send a label for ``prediction`` through the gateway (once the gateway knows ``key``)."""
    url = f"{stack.gateway}/v1/predictions/{prediction}/feedback"
    headers = {"Authorization": f"Bearer {key}"}
    wait_until(
        lambda: httpx.post(url, json={"label": 1}, headers=headers, timeout=30).status_code in (200, 201, 409),
        20,
        "the label to be recorded",
    )


def outcomes_and_labels(database_url: str) -> tuple[set[str], set[str]]:
    """The ids of every decision outcome and every feedback label in SQL."""
    engine = db.engine_for(database_url)
    try:
        with engine.connect() as conn:
            outcomes = set(conn.execute(select(DecisionOutcome.event_id)).scalars())
            labels = set(conn.execute(select(Feedback.prediction_id)).scalars())
    finally:
        engine.dispose()
    return outcomes, labels


def pg_dump(url: str) -> bytes:
    tool = shutil.which("pg_dump")
    if tool is None:
        pytest.skip("pg_dump is not installed")
    return subprocess.run([tool, "--no-owner", url], check=True, capture_output=True, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_erased_subject_leaves_no_trace_in_sql_redis_or_logs(database_url: str, tmp_path: Path) -> None:
    subject = f"subject-{secrets.token_hex(8)}"
    other = f"other-{secrets.token_hex(8)}"
    with running(tmp_path / "stack", database_url=database_url, workers=1) as stack:
        with admin_http(stack) as http:
            r = http.put(f"/admin/v1/models/{demo.MODEL_NAME}/serving", json={"cache_ttl_s": 600})
            assert r.status_code == 200, r.text
        keep_payloads(stack, "acme")
        erased_ids = decide(stack, subject, 91_234.25)
        kept_ids = decide(stack, other, 71_234.25)
        rc = stack.redis_client()
        wait_until(lambda: rc.xlen(AUDIT_STREAM) == 0, 30, "the decision log to catch up")
        labeller = stack.admin.create_key("acme", "labeller", scopes=["feedback"])["key"]
        label(stack, labeller, erased_ids[0])
        label(stack, labeller, kept_ids[0])
        outcomes, labels = outcomes_and_labels(database_url)
        assert set(erased_ids) | set(kept_ids) <= outcomes and {erased_ids[0], kept_ids[0]} <= labels
        shown = event(stack, kept_ids[0])
        assert shown["payload"]["state"] == "kept"
        needles = [subject.encode()]
        for i in range(5):
            needles += raw(row(91_234.25 + i))
        # the search is real: before the erasure the inputs are in Redis's append-only file
        assert any("appendonly" in name for name in scan_directory(stack.root, needles))

        with admin_http(stack) as http:
            r = http.post("/admin/v1/tenants/acme/subjects/erase", json={"subject": subject})
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["decisions"] == len(erased_ids) and report["keys_destroyed"] >= 1
        assert report["outcomes_deleted"] == len(erased_ids) and report["labels_deleted"] == 1
        outcomes, labels = outcomes_and_labels(database_url)
        assert not outcomes & set(erased_ids) and set(kept_ids) <= outcomes
        assert erased_ids[0] not in labels and kept_ids[0] in labels
        assert report["aof_rewritten"] and report["rdb_saved"]

        for event_id in erased_ids:
            assert event(stack, event_id)["payload"]["state"] == "erased"
        for i, event_id in enumerate(kept_ids[:3]):
            payload = event(stack, event_id)["payload"]
            assert payload["state"] == "kept"
            np.testing.assert_allclose(payload["inputs"]["input"], [row(71_234.25 + i)], rtol=1e-6)
        with stack.client("acme-subjects") as http:
            assert http.get(f"/v1/jobs/{erased_ids[-1]}").status_code == 404  # its stored result is gone
        with admin_http(stack) as http:
            verified = http.post("/admin/v1/audit/verify", json={})
        assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
        rc.close()
    # the stack is stopped: Redis has flushed its AOF; everything on disk is what is left
    assert scan_directory(tmp_path / "stack", needles) == {}
    if database_url.startswith("postgresql"):
        assert occurrences(pg_dump(database_url), needles) == []
