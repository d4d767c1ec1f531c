"""The admin trail (``GET /admin/v1/changes``): every state-changing admin call is recorded with the
principal that made it, in order, without secrets; refused calls leave no record."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion import demo
from bastion.adminclient import AdminClient, AdminError
from bastion.artifacts.store import ArtifactStore
from bastion.constants import SCOPES
from bastion.errors import Conflict
from bastion.registry import db
from bastion.registry.service import Registry
from tests.support import Stack, running

MODEL = "trail"
HOLDOUT = {"inputs": {"x": [[1.0] * 30] * 4}, "labels": [0, 1, 0, 1]}


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("changes"), workers=0, gateways=0) as s:
        yield s


@pytest.fixture(scope="module")
def operator(control: Stack) -> Iterator[tuple[AdminClient, str]]:
    """A second principal holding every scope but admin, and its key id."""
    created = control.admin.create_key("operators", "trail operator", scopes=[s for s in SCOPES if s != "admin"])
    client = AdminClient(control.control_url, created["key"])
    yield client, created["id"]
    client.close()


def _all_after(client: AdminClient, after: int, page: int = 3) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while True:
        answer = client.changes(after, page)
        assert len(answer["changes"]) <= page
        found += answer["changes"]
        if answer["next_after"] is None:
            return found
        after = answer["next_after"]


def _last_id(client: AdminClient) -> int:
    changes = _all_after(client, 0, page=1000)
    return int(changes[-1]["id"]) if changes else 0


def test_every_state_change_is_recorded_with_its_principal_and_no_secret(
    control: Stack, operator: tuple[AdminClient, str]
) -> None:
    op, op_id = operator
    admin_id = next(k["id"] for k in control.admin.keys("operators") if k["name"] == "bootstrap admin")
    start = _last_id(op)
    op.register(MODEL, demo.model_bytes())
    op.register(MODEL, demo.model_bytes(), activate=False)
    op.set_policy(MODEL, {"max_artifact_bytes": 10_000_000})
    op.set_holdout(MODEL, HOLDOUT)
    op.evaluate(MODEL, 2)
    control.admin.approve(MODEL, 2)  # four-eyes: another principal approves
    op.set_stage(MODEL, 2, "staging")
    op.deploy(MODEL, [{"version": 1, "weight": 90}, {"version": 2, "weight": 10, "role": "canary"}])
    op.rollback(MODEL)
    op.set_enabled(MODEL, False)
    op.set_enabled(MODEL, True)
    op.set_serving(MODEL, {"cache_ttl_s": 5})
    op.shadow(MODEL, reset=True)
    op.replay(MODEL)
    op.set_tenant("trail-tenant", "EU")
    key = op.create_key("trail-tenant", "trail key", scopes=["predict"])
    rotated = op.rotate_key(key["id"], 0)
    op.revoke_key(rotated["key"]["id"])
    with httpx.Client(base_url=control.control_url, headers={"Authorization": f"Bearer {control.admin_key}"}) as http:
        assert http.post("/admin/v1/snapshot").status_code == 200

    changes = _all_after(op, start)
    expected = [
        ("version.register", "model", MODEL, op_id),
        ("deployment.promote", "model", MODEL, op_id),
        ("version.register", "model", MODEL, op_id),
        ("policy.set", "model", MODEL, op_id),
        ("holdout.set", "model", MODEL, op_id),
        ("version.evaluate", "version", f"{MODEL}/2", op_id),
        ("version.approve", "version", f"{MODEL}/2", admin_id),
        ("version.stage", "version", f"{MODEL}/2", op_id),
        ("deployment.set", "model", MODEL, op_id),
        ("deployment.rollback", "model", MODEL, op_id),
        ("deployment.disable", "model", MODEL, op_id),
        ("deployment.enable", "model", MODEL, op_id),
        ("serving.set", "model", MODEL, op_id),
        ("shadow.reset", "model", MODEL, op_id),
        ("deadletters.replay", "model", MODEL, op_id),
        ("tenant.set", "tenant", "trail-tenant", op_id),
        ("key.create", "key", key["id"], op_id),
        ("key.rotate", "key", key["id"], op_id),
        ("key.revoke", "key", rotated["key"]["id"], op_id),
        ("snapshot.publish", "snapshot", "current", admin_id),
    ]
    found = [(c["action"], c["resource"]["kind"], c["resource"]["name"], c["principal"]) for c in changes]
    assert found == expected
    ids = [c["id"] for c in changes]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    by_action = {c["action"]: c for c in changes}
    assert by_action["key.create"]["detail"] == {
        "tenant": "trail-tenant",
        "scopes": ["predict"],
        "tier": control.settings.default_tier,
        "subject_trusted": False,
        "expires_at": None,
    }
    assert by_action["key.rotate"]["detail"]["new_key_id"] == rotated["key"]["id"]
    assert by_action["deployment.disable"]["detail"]["disabled"] is True
    assert by_action["tenant.set"]["detail"]["jurisdiction"] == "EU"
    dump = json.dumps(changes)
    for secret in (key["key"], rotated["secret"], control.admin_key):
        assert secret not in dump


def test_a_refused_change_leaves_no_record(control: Stack, operator: tuple[AdminClient, str]) -> None:
    op, _ = operator
    op.register("trail-refused", demo.model_bytes())
    start = _last_id(op)
    with pytest.raises(AdminError, match="409"):
        op.rollback("trail-refused")  # no earlier version
    with pytest.raises(AdminError, match="403"):
        op.create_key("operators", "too strong", scopes=["admin"])
    with pytest.raises(AdminError, match="404"):
        op.revoke_key("no-such-key")
    assert _all_after(op, start) == []


def test_the_trail_needs_the_audit_scope_and_pages_by_id(control: Stack) -> None:
    keys_only = control.admin.create_key("operators", "no audit", scopes=["keys"])["key"]
    auditor = control.admin.create_key("operators", "auditor", scopes=["audit"])["key"]
    with httpx.Client(base_url=control.control_url) as http:
        refused = http.get("/admin/v1/changes", headers={"Authorization": f"Bearer {keys_only}"})
        assert refused.status_code == 403 and "'audit'" in refused.json()["detail"]
        headers = {"Authorization": f"Bearer {auditor}"}
        everything = http.get("/admin/v1/changes", params={"limit": 1000}, headers=headers).json()["changes"]
        assert len(everything) >= 2  # at least the two key creations just made
        first, rest = everything[0], everything[1:]
        page = http.get("/admin/v1/changes", params={"after": first["id"], "limit": 1}, headers=headers).json()
        assert page["changes"] == rest[:1] and page["next_after"] == rest[0]["id"]
        assert http.get("/admin/v1/changes", params={"limit": 0}, headers=headers).status_code == 400


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    engine = db.engine_for(database_url)
    db.migrate(engine)
    yield Registry(db.session_factory(engine), ArtifactStore(tmp_path / "artifacts"), max_upload_bytes=1 << 20)
    engine.dispose()


def test_a_unit_of_work_commits_the_change_and_its_record_together_or_neither(registry: Registry) -> None:
    with pytest.raises(Conflict), registry.unit():
        registry.create_key("acme", "k", ["predict"])
        registry.trail.append("alice", "key.create", "key", "k", {"tenant": "acme", "key": "bst_secret"})
        raise Conflict("a later step failed")
    assert registry.list_keys() == [] and registry.trail.listing() == []
    with registry.unit():
        registry.create_key("acme", "k", ["predict"])
        registry.trail.append("alice", "key.create", "key", "k", {"tenant": "acme", "key": "bst_secret"})
        inside = registry.snapshot()  # the unit reads its own change
    assert len(inside["keys"]) == 1
    assert len(registry.list_keys()) == 1
    [change] = registry.trail.listing()
    assert (change["principal"], change["action"], change["detail"]) == ("alice", "key.create", {"tenant": "acme"})


def test_snapshot_serials_of_concurrent_readers_are_unique_and_only_grow(registry: Registry) -> None:
    with ThreadPoolExecutor(8) as pool:
        serials = list(pool.map(lambda _: registry.snapshot()["serial"], range(40)))
    assert len(set(serials)) == len(serials)
    assert registry.snapshot()["serial"] > max(serials)


def test_concurrent_units_creating_one_new_tenant_do_not_collide(registry: Registry) -> None:
    """Units run one at a time, so 'create the tenant unless it exists' cannot race."""

    def unit(i: int) -> None:
        with registry.unit():
            registry.set_tenant("newco", "EU" if i % 2 else None)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(unit, range(16)))
    assert [t["name"] for t in registry.list_tenants()] == ["newco"]
