"""API keys through the admin API: created once, refused after revocation, never stored in clear."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bastion.security import apikeys
from bastion.snapshot import KeyInfo, Snapshot
from tests.support import Stack, wait_until

ROW = [1.0] * 30


def _predict(stack: Stack, key: str) -> int:
    return httpx.post(
        f"{stack.gateway}/v1/models/breast-cancer/predict",
        json={"inputs": [ROW]},
        headers={"Authorization": f"Bearer {key}"},
    ).status_code


def test_revoked_key_is_refused_by_the_gateway_within_a_second(stack: Stack) -> None:
    created = stack.admin.create_key("acme", "short-lived")
    wait_until(lambda: _predict(stack, created["key"]) == 200, 5, "the key to work")
    stack.admin.revoke_key(created["id"])
    started = time.monotonic()
    wait_until(lambda: _predict(stack, created["key"]) == 401, 5, "the revoked key to be refused")
    assert time.monotonic() - started < 1.0
    assert any(k["id"] == created["id"] and k["revoked"] for k in stack.admin.keys("acme"))


def test_keys_are_stored_as_hashes_only(stack: Stack) -> None:
    created = stack.admin.create_key("acme", "hash check")
    db = sqlite3.connect(stack.root / "bastion.db")
    rows = db.execute("select digest from api_keys").fetchall()
    dump = "\n".join(db.iterdump())
    db.close()
    assert created["key"] not in dump
    assert all(len(r[0]) == 64 for r in rows)
    assert all("key" not in k for k in stack.admin.keys())


def test_admin_api_requires_an_admin_key(stack: Stack) -> None:
    with httpx.Client(base_url=stack.control_url) as http:
        assert http.get("/admin/v1/models").status_code == 401
        tenant_key = stack.keys["acme"]
        r = http.get("/admin/v1/models", headers={"Authorization": f"Bearer {tenant_key}"})
        assert r.status_code == 403
        assert r.headers["content-type"] == "application/problem+json"


def test_admin_keys_are_not_published_to_gateways(stack: Stack) -> None:
    """Gateways never learn admin keys: the admin key is refused on the public port."""
    assert _predict(stack, stack.admin_key) == 401


def test_operators_mark_a_key_trusted_to_name_its_subject_and_it_reaches_the_snapshot(stack: Stack) -> None:
    """``subject_trusted`` is off unless asked for; it is listed, published, parsed and kept by rotation."""
    trusted = stack.admin.create_key("acme", "back end", subject_trusted=True)
    plain = stack.admin.create_key("acme", "app")
    assert (trusted["subject_trusted"], plain["subject_trusted"]) == (True, False)
    listed = {k["id"]: k["subject_trusted"] for k in stack.admin.keys("acme")}
    assert (listed[trusted["id"]], listed[plain["id"]]) == (True, False)
    rotated = stack.admin.rotate_key(trusted["id"], 60)
    assert rotated["key"]["subject_trusted"] is True
    keys = Snapshot.parse(stack.published_snapshot()).keys
    assert keys[apikeys.digest(trusted["key"])].subject_trusted is True
    assert keys[apikeys.digest(rotated["secret"])].subject_trusted is True
    assert keys[apikeys.digest(plain["key"])].subject_trusted is False
    assert KeyInfo("k", "t", frozenset(), None).subject_trusted is False  # positional constructions keep working
    cli = subprocess.run(
        [sys.executable, "-m", "bastion", "keys", "create", "--tenant", "acme", "--subject-trusted", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "BASTION_ADMIN_KEY": stack.admin_key, "BASTION_CONTROL_URL": stack.control_url},
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert '"subject_trusted": true' in cli.stdout


def test_no_key_or_input_reaches_the_logs(tmp_path: Path) -> None:
    stack = Stack(tmp_path, log_level="debug")
    try:
        stack.start()
        _no_secrets_in_logs(stack)
    finally:
        stack.stop()


def _no_secrets_in_logs(stack: Stack) -> None:
    secret = stack.keys["acme"]
    marker = 12345.678901
    assert _predict(stack, secret) == 200
    httpx.post(
        f"{stack.gateway}/v1/models/breast-cancer/predict",
        json={"inputs": [[marker] * 30]},
        headers={"Authorization": f"Bearer {secret}"},
    )
    httpx.post(f"{stack.gateway}/v1/models/breast-cancer/predict", headers={"Authorization": f"Bearer {secret}x"})
    time.sleep(0.5)
    logs = "".join(p.read_text(errors="replace") for p in stack.root.glob("*.log"))
    assert logs, "the processes write logs"
    for leaked in (secret, secret[len("bst_") + 13 :], stack.admin_key, str(marker)):
        assert leaked not in logs
