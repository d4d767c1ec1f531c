"""The admin API over HTTP and the CLI that drives it: registration of safe and unsafe artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from bastion import demo
from tests.support import Stack

# A pickle stream that would call os.system("id") if anything unpickled it.
PICKLE = (
    b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94."
)


def _admin(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30)


def test_a_pickle_renamed_onnx_is_refused_with_a_problem(stack: Stack, tmp_path: Path) -> None:
    with _admin(stack) as http:
        r = http.post(
            "/admin/v1/models/evil/versions", content=PICKLE, headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "pickle" in r.json()["detail"]
        assert http.get("/admin/v1/models/evil").status_code == 404
    evil = tmp_path / "model.onnx"
    evil.write_bytes(PICKLE)
    cli = subprocess.run(
        [sys.executable, "-m", "bastion", "models", "register", "evil", str(evil), "--control-url", stack.control_url],
        capture_output=True,
        text=True,
        env={**os.environ, "BASTION_ADMIN_KEY": stack.admin_key},
        timeout=60,
    )
    assert cli.returncode == 1
    assert "422" in cli.stderr and "pickle" in cli.stderr
    assert "Traceback" not in cli.stderr


def test_upload_needs_the_octet_stream_content_type(stack: Stack) -> None:
    with _admin(stack) as http:
        r = http.post("/admin/v1/models/m/versions", content=demo.model_bytes(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert r.headers["content-type"] == "application/problem+json"


def test_cli_registers_lists_and_manages_keys(stack: Stack, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(demo.model_bytes())
    env = {**os.environ, "BASTION_ADMIN_KEY": stack.admin_key, "BASTION_CONTROL_URL": stack.control_url}

    def bastion(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "bastion", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def api(*args: str) -> Any:
        return json.loads(bastion(*args, "--json"))

    assert api("models", "register", "second-model", str(model))["version"] == 1
    assert "second-model" in [m["name"] for m in api("models", "list")]
    created = api("keys", "create", "--tenant", "initech", "--scope", "predict")
    assert created["key"].startswith("bst_")
    assert api("keys", "revoke", created["id"])["revoked"] is True
    assert "bst_" not in bastion("keys", "list", "--tenant", "initech")
    assert api("models", "register", "second-model", str(model), "--no-activate")["version"] == 2
    deployed = api("deploy", "set", "second-model", "--route", "1:90", "--route", "2:10:canary")
    assert {"version": 2, "weight": 10, "role": "canary"} in deployed["routes"]
    shown = api("deploy", "show", "second-model")
    assert shown["routes"][0]["version"] == 1 and shown["disabled"] is False
    assert api("deploy", "disable", "second-model")["disabled"] is True
    assert api("deploy", "enable", "second-model")["disabled"] is False


def test_invalid_key_request_is_a_problem(stack: Stack) -> None:
    with _admin(stack) as http:
        r = http.post("/admin/v1/keys", json={"tenant": "acme", "scopes": ["root"], "extra": 1})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"


def test_key_expiry_without_a_time_zone_is_utc(stack: Stack) -> None:
    with _admin(stack) as http:
        naive = http.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": "2030-01-01T00:00:00"})
        aware = http.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": "2030-01-01T01:00:00+01:00"})
        vague = http.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": "in a while"})
        numeric = http.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": 1893456000})
    assert numeric.status_code == 400 and "ISO 8601" in numeric.text, numeric.text
    assert naive.status_code == aware.status_code == 201, (naive.text, aware.text)
    assert naive.json()["expires_at"] == aware.json()["expires_at"] == "2030-01-01T00:00:00.000Z"
    assert vague.status_code == 400, vague.text
    assert vague.headers["content-type"] == "application/problem+json"


def test_a_second_upload_to_the_same_version_is_409(stack: Stack) -> None:
    with _admin(stack) as http:
        url = "/admin/v1/models/pinned-api/versions?version=3"
        headers = {"Content-Type": "application/octet-stream"}
        assert http.post(url, content=demo.model_bytes(), headers=headers).status_code == 201
        again = http.post(url, content=demo.model_bytes(), headers=headers)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert "immutable" in again.json()["detail"]
