"""Grants on a real control plane: no principal can create, rotate or revoke a key with a scope it
does not hold itself, so none can mint an admin key or take over the bootstrap admin key.

The cases are generated from ``bastion.constants.SCOPES``: for every scope ``s``, a key manager
holding ``{"keys", s}`` is tried against every scope it lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.constants import SCOPES
from tests.support import Stack, running

MANAGED = [s for s in SCOPES if s != "admin"]  # "admin" holds every scope: its own case below
WITHOUT_KEYS = [s for s in SCOPES if s not in ("keys", "admin")]


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Only the control plane (and Redis): grants are decided there."""
    with running(tmp_path_factory.mktemp("grants"), workers=0, gateways=0) as s:
        yield s


def _as(stack: Stack, secret: str) -> httpx.Client:
    return httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {secret}"}, timeout=30)


def _key(stack: Stack, scopes: list[str], tenant: str = "operators") -> dict[str, Any]:
    return stack.admin.create_key(tenant, "grants " + "+".join(scopes), scopes=scopes)


def _held(scope: str) -> list[str]:
    return sorted({"keys", scope})


def _refused(r: httpx.Response, *beyond: str) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    detail = r.json()["detail"]
    assert "exceed the caller's" in detail, detail
    for scope in beyond:
        assert repr(scope) in detail, (scope, detail)


def _live(stack: Stack, key_id: str) -> bool:
    return any(k["id"] == key_id and not k["revoked"] for k in stack.admin.keys())


@pytest.mark.parametrize("scope", MANAGED)
def test_a_key_manager_creates_keys_with_exactly_its_scopes_or_fewer(control: Stack, scope: str) -> None:
    held = _held(scope)
    manager = _key(control, held)
    with _as(control, manager["key"]) as http:
        for tenant in ("operators", "acme"):
            for scopes in (held, [scope]):
                r = http.post("/admin/v1/keys", json={"tenant": tenant, "name": "within", "scopes": scopes})
                assert r.status_code == 201, (tenant, scopes, r.text)
                assert r.json()["scopes"] == sorted(set(scopes))


@pytest.mark.parametrize("scope", MANAGED)
def test_a_key_manager_cannot_create_a_key_with_a_scope_it_lacks(control: Stack, scope: str) -> None:
    held = _held(scope)
    manager = _key(control, held)
    before = {k["id"] for k in control.admin.keys()}
    with _as(control, manager["key"]) as http:
        for extra in sorted(set(SCOPES) - set(held)):
            for tenant in ("operators", "acme"):
                r = http.post("/admin/v1/keys", json={"tenant": tenant, "scopes": [*held, extra]})
                _refused(r, extra)
                assert "key" not in r.json()
        r = http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": ["admin"]})
        _refused(r, "admin")
    assert {k["id"] for k in control.admin.keys()} == before, "a refused key was created anyway"


@pytest.mark.parametrize("scope", MANAGED)
def test_a_key_manager_cannot_rotate_or_revoke_a_key_with_a_scope_it_lacks(control: Stack, scope: str) -> None:
    held = _held(scope)
    manager = _key(control, held)
    bootstrap = next(k for k in control.admin.keys("operators") if k["name"] == "bootstrap admin")
    victims = [_key(control, [extra]) for extra in sorted(set(SCOPES) - set(held))]
    victims.append(_key(control, [*sorted({*held, "audit", "deploy"} - {scope}), "admin"]))
    with _as(control, manager["key"]) as http:
        for victim in [*victims, bootstrap]:
            beyond = sorted(set(victim["scopes"]) - set(held))
            rotated = http.post(f"/admin/v1/keys/{victim['id']}/rotate", json={"overlap_s": 0})
            _refused(rotated, *beyond)
            assert "secret" not in rotated.json()
            _refused(http.delete(f"/admin/v1/keys/{victim['id']}"), *beyond)
            assert _live(control, victim["id"]), "a refused rotation or revocation changed the key"
        # A rotation cannot widen a key either: the body names no scopes.
        own = _key(control, held)
        widened = http.post(f"/admin/v1/keys/{own['id']}/rotate", json={"overlap_s": 0, "scopes": ["admin"]})
        assert widened.status_code == 400, widened.text
        # Keys within its scopes it rotates (keeping their scopes) and revokes.
        rotated = http.post(f"/admin/v1/keys/{own['id']}/rotate", json={"overlap_s": 0})
        assert rotated.status_code == 201, rotated.text
        assert rotated.json()["key"]["scopes"] == held and rotated.json()["secret"].startswith("bst_")
        revoked = http.delete(f"/admin/v1/keys/{rotated.json()['key']['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    # The bootstrap admin key still works: nobody took it over or locked it out.
    assert control.admin.models()


@pytest.mark.parametrize("scope", WITHOUT_KEYS)
def test_a_principal_without_the_keys_scope_manages_no_keys(control: Stack, scope: str) -> None:
    holder = _key(control, [scope])
    own = _key(control, [scope])
    with _as(control, holder["key"]) as http:
        for r in (
            http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": [scope]}),
            http.post(f"/admin/v1/keys/{own['id']}/rotate", json={"overlap_s": 0}),
            http.delete(f"/admin/v1/keys/{own['id']}"),
        ):
            assert r.status_code == 403 and "lacks the 'keys' scope" in r.json()["detail"], r.text


def test_only_an_admin_grants_admin_and_an_admin_holds_every_scope(control: Stack) -> None:
    everything_else = _key(control, MANAGED)
    with _as(control, everything_else["key"]) as http:
        _refused(http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": ["admin"]}), "admin")
        r = http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": MANAGED})
        assert r.status_code == 201, r.text
    second_admin = _key(control, ["admin"])
    with _as(control, second_admin["key"]) as http:
        r = http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": list(SCOPES)})
        assert r.status_code == 201 and r.json()["scopes"] == sorted(SCOPES), r.text
        rotated = http.post(f"/admin/v1/keys/{everything_else['id']}/rotate", json={"overlap_s": 0})
        assert rotated.status_code == 201, rotated.text


def test_unknown_scopes_are_a_400_not_a_403(control: Stack) -> None:
    manager = _key(control, ["keys"])
    with _as(control, manager["key"]) as http:
        r = http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": ["root"]})
    assert r.status_code == 400 and "unknown or missing scopes" in r.json()["detail"], r.text


def test_a_key_manager_mints_no_key_that_outlives_its_own(control: Stack) -> None:
    """A key manager whose key expires tomorrow cannot create itself a key that never expires,
    or one that expires later than its own; earlier is fine."""
    from datetime import UTC, datetime, timedelta

    soon = datetime.now(UTC) + timedelta(days=1)
    with _as(control, control.admin_key) as admin:
        r = admin.post(
            "/admin/v1/keys", json={"tenant": "operators", "scopes": ["keys"], "expires_at": soon.isoformat()}
        )
        assert r.status_code == 201, r.text
        manager = r.json()["key"]
    with _as(control, manager) as http:
        forever = http.post("/admin/v1/keys", json={"tenant": "operators", "scopes": ["keys"]})
        later = http.post(
            "/admin/v1/keys",
            json={"tenant": "operators", "scopes": ["keys"], "expires_at": (soon + timedelta(days=1)).isoformat()},
        )
        earlier = http.post(
            "/admin/v1/keys",
            json={"tenant": "operators", "scopes": ["keys"], "expires_at": (soon - timedelta(hours=1)).isoformat()},
        )
        lasting = control.admin.create_key("operators", "lasting", scopes=["keys"])
        rotated = http.post(f"/admin/v1/keys/{lasting['id']}/rotate", json={"overlap_s": 0})
    assert rotated.status_code == 403, "rotating a key that never expires would hand the caller one"
    assert forever.status_code == later.status_code == 403, (forever.text, later.text)
    assert "no later than the caller's own key" in forever.json()["detail"]
    assert earlier.status_code == 201, earlier.text


def test_tenant_policy_attributes_need_deploy_and_signing_keys_need_admin(control: Stack) -> None:
    """With ``keys`` alone a principal sets budgets, but cannot move a tenant past a policy rule
    (jurisdiction, consent flags: ``deploy`` too) or install an artifact-signing key (``admin``)."""
    control.admin.set_tenant("eu-corp", "EU")
    manager = _key(control, ["keys"])
    deployer = _key(control, ["deploy", "keys"])
    public = "vLliKXt01iEKy/ZCY3Ehc5nokGLwhxIOdUwIarilGSw="  # base64 of a raw Ed25519 public key
    with _as(control, manager["key"]) as http:
        budget = http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": "EU", "limits": {"burst": 10}})
        moved = http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": "US"})
        cleared = http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": None})
        kept = http.put("/admin/v1/tenants/eu-corp", json={"limits": {"burst": 20}})  # omitted: kept as it is
        consents = http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": "EU", "consents": ["profiling"]})
        signing = http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": "EU", "signing_key": public})
    assert budget.status_code == 200, budget.text
    assert kept.status_code == 200 and kept.json()["jurisdiction"] == "EU", kept.text
    assert moved.status_code == cleared.status_code == consents.status_code == 403
    assert "'deploy' scope" in moved.json()["detail"]
    assert signing.status_code == 403 and "'admin' scope" in signing.json()["detail"]
    with _as(control, deployer["key"]) as http:
        assert http.put("/admin/v1/tenants/eu-corp", json={"jurisdiction": "US"}).status_code == 200
    (tenant,) = [t for t in control.admin._call("GET", "/admin/v1/tenants")["tenants"] if t["name"] == "eu-corp"]
    assert tenant["jurisdiction"] == "US" and not tenant["signing_key"]
