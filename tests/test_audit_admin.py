"""The admin side of the decision log, on a running stack: every state-changing admin route (read
from the admin OpenAPI document, as the security suite reads it) leaves an admin event in the log
with its principal, action, route template and the SHA-256 of the body as sent; every new route
answers bad input with a 4xx problem, never a 5xx, and gives no oracle across tenants; and the
CLI reads, proves, exports and verifies the log (offline too), and sets a tenant's retention."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion import demo
from bastion.constants import SCOPES
from tests.support import Stack, running, wait_until

MODEL = "audited"
TENANT = "audit-tenant"
HOLDOUT = {"inputs": {"x": [[1.0] * 30] * 4}, "labels": [0, 1, 0, 1]}
ROW = [1.0] * 30
READ_ONLY = {("post", "/admin/v1/audit/search"), ("post", "/admin/v1/audit/verify")}  # POST: bodies stay out of URLs
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("audit-admin"), workers=1, gateways=1) as s:
        yield s


@dataclass
class Operator:
    http: httpx.Client
    key_id: str


@pytest.fixture(scope="module")
def operator(stack: Stack) -> Iterator[Operator]:
    """A principal of its own (every scope but admin), so each event's principal is telling."""
    created = stack.admin.create_key("operators", "audit operator", scopes=[s for s in SCOPES if s != "admin"])
    with _client(stack, created["key"]) as http:
        yield Operator(http, created["id"])


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[Operator]:
    key_id = next(k["id"] for k in stack.admin.keys("operators") if k["name"] == "bootstrap admin")
    with _client(stack, stack.admin_key) as http:
        yield Operator(http, key_id)


def _client(stack: Stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


@dataclass
class Call:
    """One admin call made, and what its event must say."""

    method: str
    template: str
    action: str
    principal: str
    body: bytes | None  # as sent; None: the body names a subject and is never digested


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _chunks(body: bytes) -> Iterator[bytes]:
    """The body in three chunks: httpx sends it with Transfer-Encoding: chunked."""
    third = max(1, len(body) // 3)
    yield from (body[i : i + third] for i in range(0, len(body), third))


def _send(
    who: Operator,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    chunked: bool = False,
    content_type: str = "application/json",
    params: dict[str, str] | None = None,
) -> httpx.Response:
    headers = {"content-type": content_type} if body else {}
    content: Any = _chunks(body) if chunked else body
    answer = who.http.request(method, "/admin/v1" + path, content=content, headers=headers, params=params)
    assert answer.status_code < 300, (method, path, answer.status_code, answer.text[:300])
    return answer


def _events_after(http: httpx.Client, position: int) -> list[dict[str, Any]]:
    """Every admin and erasure event after ``position``, paging through the search."""
    found: list[dict[str, Any]] = []
    for kind in ("admin", "erasure"):
        after: int | None = position
        while after is not None:
            page = http.post("/admin/v1/audit/search", json={"kind": kind, "after": after, "limit": 1000}).json()
            found += [e["event"] for e in page["events"]]
            after = page["next_after"]
    return found


def _log_size(http: httpx.Client) -> int:
    return int(http.get("/admin/v1/audit/leaves", params={"start": 0, "limit": 1}).json()["size"])


def _state_changing_routes(stack: Stack) -> set[tuple[str, str]]:
    from bastion.control.app import create_app as control_app

    doc = control_app(stack.settings).openapi()
    return {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in {"post", "put", "delete", "patch"}
    }


def _every_admin_action(stack: Stack, op: Operator, admin: Operator) -> list[Call]:
    """Call every state-changing admin route once, with valid input; what each call must log."""
    calls: list[Call] = []

    def call(
        who: Operator, method: str, template: str, action: str, path: str, body: bytes = b"", **kw: Any
    ) -> httpx.Response:
        answer = _send(who, method, path, body, **kw)
        calls.append(Call(method, f"{method} /admin/v1{template}", action, who.key_id, body))
        return answer

    onnx = demo.model_bytes()
    versions = "/models/{name}/versions"
    call(
        op,
        "POST",
        versions,
        "version.register",
        f"/models/{MODEL}/versions",
        onnx,
        content_type="application/octet-stream",
    )
    calls.append(Call("POST", f"POST /admin/v1{versions}", "deployment.promote", op.key_id, onnx))  # v1 goes live
    call(
        op,
        "POST",
        versions,
        "version.register",
        f"/models/{MODEL}/versions",
        onnx,
        chunked=True,  # an upload streamed in chunks: digested on its way, never held twice
        content_type="application/octet-stream",
        params={"activate": "false"},
    )
    call(
        op,
        "PUT",
        "/models/{name}/policy",
        "policy.set",
        f"/models/{MODEL}/policy",
        _json({"max_artifact_bytes": 10**7}),
    )
    call(op, "PUT", "/models/{name}/holdout", "holdout.set", f"/models/{MODEL}/holdout", _json(HOLDOUT))
    version = "/models/{name}/versions/{version}"
    call(op, "POST", version + "/evaluate", "version.evaluate", f"/models/{MODEL}/versions/2/evaluate")
    call(admin, "POST", version + "/approve", "version.approve", f"/models/{MODEL}/versions/2/approve")  # four eyes
    call(
        op,
        "POST",
        version + "/stage",
        "version.stage",
        f"/models/{MODEL}/versions/2/stage",
        _json({"stage": "staging"}),
    )
    routes = {"routes": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10, "role": "canary"}]}
    call(op, "PUT", "/models/{name}/deployment", "deployment.set", f"/models/{MODEL}/deployment", _json(routes))
    # a body the route never reads is digested all the same
    call(op, "POST", "/models/{name}/rollback", "deployment.rollback", f"/models/{MODEL}/rollback", b"ignored")
    call(op, "POST", "/models/{name}/disable", "deployment.disable", f"/models/{MODEL}/disable")
    call(op, "POST", "/models/{name}/enable", "deployment.enable", f"/models/{MODEL}/enable")
    serving = _json({"cache_ttl_s": 5})
    call(op, "PUT", "/models/{name}/serving", "serving.set", f"/models/{MODEL}/serving", serving, chunked=True)
    call(op, "PUT", "/models/{name}/guards", "guards.set", f"/models/{MODEL}/guards", _json({"injection": "flag"}))
    call(op, "DELETE", "/models/{name}/shadow", "shadow.reset", f"/models/{MODEL}/shadow")
    replay = "/models/{name}/dead-letters/replay"
    call(op, "POST", replay, "deadletters.replay", f"/models/{MODEL}/dead-letters/replay", _json({"ids": []}))
    tenant = _json({"jurisdiction": "EU", "retain_payloads_s": 86_400})
    call(op, "PUT", "/tenants/{name}", "tenant.set", f"/tenants/{TENANT}", tenant)
    created = call(op, "POST", "/keys", "key.create", "/keys", _json({"tenant": TENANT, "scopes": ["predict"]})).json()
    key = created["id"]
    call(op, "POST", "/keys/{key_id}/rotate", "key.rotate", f"/keys/{key}/rotate", _json({"overlap_s": 0}))
    call(op, "DELETE", "/keys/{key_id}", "key.revoke", f"/keys/{key}")
    call(op, "POST", "/snapshot", "snapshot.publish", "/snapshot")
    subject = _json({"subject": "bob@example.com"})
    exported = call(
        op, "POST", "/tenants/{tenant}/subjects/export", "subject.export", f"/tenants/{TENANT}/subjects/export", subject
    )
    assert exported.json()["decisions"] == []
    call(op, "POST", "/tenants/{tenant}/subjects/erase", "subject.erase", f"/tenants/{TENANT}/subjects/erase", subject)
    for c in calls:
        if "/subjects/" in c.template:
            c.body = None
    return calls


def test_every_state_changing_admin_route_is_an_event_with_its_principal_route_and_body_digest(
    stack: Stack, operator: Operator, admin: Operator
) -> None:
    start = _log_size(admin.http) - 1
    calls = _every_admin_action(stack, operator, admin)
    called = {(c.method.lower(), c.template.split(" ", 1)[1]) for c in calls}
    assert called | READ_ONLY == _state_changing_routes(stack), "a state-changing route this test does not call"

    def logged() -> bool:
        return len(_events_after(admin.http, start)) >= len(calls)

    wait_until(logged, 30, "the admin events to be logged")
    events = _events_after(admin.http, start)
    for c in calls:
        matching = [
            e
            for e in events
            if e["action"] == c.action and e.get("route") == c.template and e["principal"] == c.principal
        ]
        assert matching, f"no event for {c.template} ({c.action}) by {c.principal}: {[e['action'] for e in events]}"
        event = matching[0]
        events.remove(event)
        if c.body is None:  # the body names a data subject: neither it nor a digest of it is logged
            assert "body_sha256" not in event, event
            assert "bob@example.com" not in json.dumps(event)
        else:
            assert event["body_sha256"] == hashlib.sha256(c.body).hexdigest(), (c.template, event)
        assert event["kind"] == ("erasure" if c.action == "subject.erase" else "admin")


def test_every_new_route_answers_bad_input_with_a_4xx_problem(stack: Stack, admin: Operator) -> None:
    huge = str(2**70)
    size = _log_size(admin.http)
    beyond = str(size + 10**9)
    bad: list[tuple[str, str, Any]] = [
        ("GET", "/audit/events/no-such-event", None),
        ("GET", "/audit/events/" + "x" * 65, None),
        ("GET", "/audit/events/bad%20id", None),
        ("GET", "/audit/events/admin-1?tenant=" + "t" * 65, None),
        ("POST", "/audit/search", {"limit": 0}),
        ("POST", "/audit/search", {"limit": 1001}),
        ("POST", "/audit/search", {"limit": -1}),
        ("POST", "/audit/search", {"after": -1}),
        ("POST", "/audit/search", {"after": int(huge)}),
        ("POST", "/audit/search", {"since": "not a time"}),
        ("POST", "/audit/search", {"since": 1_700_000_000}),
        ("POST", "/audit/search", {"since": "2030-01-02", "until": "2030-01-01"}),
        ("POST", "/audit/search", {"subject": "alice"}),
        ("POST", "/audit/search", {"tenant": "acme", "version": 1}),
        ("POST", "/audit/search", {"kind": "everything"}),
        ("POST", "/audit/search", {"tenant": "NOT A TENANT"}),
        ("POST", "/audit/search", {"tenant": "acme", "subject": "x" * 257}),
        ("POST", "/audit/search", {"unknown": 1}),
        ("POST", "/audit/search", "not json"),
        ("POST", "/audit/search", [1, 2]),
        ("POST", "/audit/verify", {"from": -1}),
        ("POST", "/audit/verify", {"from": 5, "to": 2}),
        ("POST", "/audit/verify", {"to": int(beyond)}),
        ("POST", "/audit/verify", {"from": int(beyond)}),
        ("POST", "/audit/verify", {"from": int(huge)}),
        ("POST", "/audit/verify", {"from": "zero"}),
        ("GET", "/audit/checkpoints?after=-1", None),
        ("GET", "/audit/checkpoints?limit=0", None),
        ("GET", "/audit/checkpoints?limit=1001", None),
        ("GET", "/audit/checkpoints?limit=many", None),
        ("GET", f"/audit/checkpoints?after={huge}", None),
        ("GET", "/audit/events/no-such-event/proof", None),
        ("GET", "/audit/events/admin-1/proof?size=0", None),
        ("GET", f"/audit/events/admin-1/proof?size={beyond}", None),
        ("GET", f"/audit/events/admin-1/proof?size={huge}", None),
        ("GET", "/audit/consistency", None),
        ("GET", "/audit/consistency?first=0&second=1", None),
        ("GET", "/audit/consistency?first=5&second=2", None),
        ("GET", f"/audit/consistency?first=1&second={beyond}", None),
        ("GET", f"/audit/consistency?first=1&second={huge}", None),
        ("GET", "/audit/leaves?start=-1", None),
        ("GET", f"/audit/leaves?start={beyond}", None),
        ("GET", "/audit/leaves?limit=0", None),
        ("GET", "/audit/leaves?limit=1001", None),
        ("POST", "/tenants/no-such-tenant/subjects/erase", {"subject": "alice"}),
        ("POST", "/tenants/no-such-tenant/subjects/export", {"subject": "alice"}),
        ("POST", "/tenants/acme/subjects/erase", {"subject": ""}),
        ("POST", "/tenants/acme/subjects/export", {"subject": "x" * 257}),
        ("POST", "/tenants/acme/subjects/erase", {}),
        ("POST", "/tenants/acme/subjects/export", {"subject": "a", "extra": 1}),
        ("POST", "/tenants/NOT%20A%20TENANT/subjects/export", {"subject": "alice"}),
        ("PUT", "/tenants/acme", {"retain_payloads_s": -1}),
        ("PUT", "/tenants/acme", {"retain_payloads_s": 10**12}),
        ("PUT", "/tenants/acme", {"retain_payloads_s": "30d"}),
    ]
    for method, path, body in bad:
        if isinstance(body, str):
            r = admin.http.request(
                method, "/admin/v1" + path, content=body, headers={"content-type": "application/json"}
            )
        else:
            r = admin.http.request(method, "/admin/v1" + path, json=body)
        where = f"{method} {path} {body!r}: {r.status_code} {r.text[:200]}"
        assert 400 <= r.status_code < 500, where
        assert r.headers["content-type"] == PROBLEM, where


def _decide(stack: Stack, tenant: str, subject: str) -> str:
    with stack.client(f"{tenant}-subjects", headers={"X-Bastion-Subject": subject}) as http:
        answer = http.post("/v1/models/breast-cancer/predict", json={"inputs": [ROW]})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def _logged(http: httpx.Client, event_id: str) -> bool:
    return http.get(f"/admin/v1/audit/events/{event_id}").status_code == 200


def test_reading_a_decision_is_scoped_to_its_tenant_and_gives_no_oracle(stack: Stack, admin: Operator) -> None:
    http = admin.http
    assert http.put("/admin/v1/tenants/acme", json={"retain_payloads_s": 3600}).status_code == 200
    mine = _decide(stack, "acme", "carol")
    wait_until(lambda: _logged(http, mine), 20, "the decision to be logged")
    shown = http.get(f"/admin/v1/audit/events/{mine}", params={"tenant": "acme"}).json()
    assert shown["event"]["tenant"] == "acme" and shown["event"]["kind"] == "decision"
    assert shown["payload"]["state"] == "kept" and "inputs" in shown["payload"]
    assert "carol" not in json.dumps(shown["event"])
    theirs = http.get(f"/admin/v1/audit/events/{mine}", params={"tenant": "globex"})
    missing = http.get(f"/admin/v1/audit/events/{'x' * len(mine)}", params={"tenant": "globex"})
    assert theirs.status_code == missing.status_code == 404
    assert theirs.text.replace(mine, "x" * len(mine)) == missing.text  # no oracle
    found = http.post("/admin/v1/audit/search", json={"tenant": "acme", "subject": "carol"}).json()["events"]
    assert [e["event"]["id"] for e in found] == [mine]
    # the same subject string under another tenant is another subject: nothing found, as for a stranger
    elsewhere = http.post("/admin/v1/audit/search", json={"tenant": "globex", "subject": "carol"}).json()
    stranger = http.post("/admin/v1/audit/search", json={"tenant": "globex", "subject": "nobody-at-all"}).json()
    unknown = http.post("/admin/v1/audit/search", json={"tenant": "no-such-tenant", "subject": "carol"}).json()
    assert elsewhere == stranger == unknown == {"events": [], "next_after": None}
    exported = http.post("/admin/v1/tenants/globex/subjects/export", json={"subject": "carol"}).json()
    assert exported["decisions"] == []


def test_pages_are_keyset_pages_and_proofs_verify(stack: Stack, admin: Operator) -> None:
    from bastion.audit import merkle
    from bastion.cli.audit import proof_holds

    http = admin.http
    ids = [_decide(stack, "globex", "dave") for _ in range(5)]
    wait_until(lambda: all(_logged(http, i) for i in ids), 20, "the decisions to be logged")
    pages, after = [], None
    while True:
        page = http.post(
            "/admin/v1/audit/search", json={"tenant": "globex", "subject": "dave", "limit": 2, "after": after}
        ).json()
        pages.append([e["event"]["id"] for e in page["events"]])
        after = page["next_after"]
        if after is None:
            break
    assert [i for p in pages for i in p] == ids and all(len(p) <= 2 for p in pages)

    def covered() -> bool:
        answer = http.get("/admin/v1/audit/checkpoint")
        return (
            answer.status_code == 200
            and answer.json()["size"] > http.get(f"/admin/v1/audit/events/{ids[-1]}").json()["position"]
        )

    wait_until(covered, 20, "a checkpoint covering the decisions")
    proof = http.get(f"/admin/v1/audit/events/{ids[0]}/proof").json()
    assert proof_holds(proof)
    forged = {**proof, "leaf_hash": "00" * 32}
    assert not proof_holds(forged)
    latest = http.get("/admin/v1/audit/checkpoint").json()
    checkpoints = http.get("/admin/v1/audit/checkpoints", params={"limit": 1000}).json()["checkpoints"]
    first = checkpoints[0]
    consistency = http.get(
        "/admin/v1/audit/consistency", params={"first": first["size"], "second": latest["size"]}
    ).json()
    assert merkle.verify_consistency(
        first["size"],
        latest["size"],
        bytes.fromhex(first["root"]),
        bytes.fromhex(latest["root"]),
        [bytes.fromhex(h) for h in consistency["proof"]],
    )
    report = http.post("/admin/v1/audit/verify", json={}).json()
    assert report["ok"] and report["findings"] == []
    middle = http.post("/admin/v1/audit/verify", json={"from": 2, "to": latest["size"]}).json()
    assert middle["ok"] and middle["first_position"] == 2


def _cli(stack: Stack, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BASTION_CONTROL_URL": stack.control_url, "BASTION_ADMIN_KEY": stack.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args], env=env, capture_output=True, text=True, timeout=180, input=stdin
    )


def test_the_cli_exports_and_verifies_the_log_offline_and_names_a_tampered_position(
    stack: Stack, tmp_path: Path
) -> None:
    out = tmp_path / "export"
    done = _cli(stack, "audit", "export", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["leaves"] > 0 and manifest["start"] == 0
    checked = _cli(stack, "audit", "verify", "--offline", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "OK" in checked.stdout
    keys = tmp_path / "keys.json"
    keys.write_text(_cli(stack, "audit", "keys", "--json").stdout)
    pinned = _cli(stack, "audit", "verify", "--offline", str(out), "--public-keys", str(keys), "--json")
    assert pinned.returncode == 0 and json.loads(pinned.stdout)["ok"]
    online = _cli(stack, "audit", "verify", "--json")
    assert online.returncode == 0 and json.loads(online.stdout)["ok"]

    lines = (out / "events.jsonl").read_text().splitlines()
    edited = json.loads(lines[3])
    body = bytearray(base64.b64decode(edited["body"]))
    body[10] ^= 1
    edited["body"] = base64.b64encode(bytes(body)).decode()
    lines[3] = json.dumps(edited)
    (out / "events.jsonl").write_text("\n".join(lines) + "\n")
    broken = _cli(stack, "audit", "verify", "--offline", str(out), "--json")
    assert broken.returncode == 3, broken.stdout + broken.stderr
    assert json.loads(broken.stdout)["findings"][0]["position"] == edited["position"]
    # from the middle of the log: the export carries the frontier at its start, and still verifies
    middle = manifest["end"] // 2
    with _client(stack, stack.admin_key) as http:
        page = http.post("/admin/v1/audit/search", json={"after": middle - 1, "limit": 1}).json()
    at = page["events"][0]["event"]["at"]
    since = _cli(stack, "audit", "export", "--since", at, "--out", str(tmp_path / "recent"), "--json")
    assert since.returncode == 0, since.stderr
    assert 0 < json.loads(since.stdout)["start"] <= middle
    assert json.loads((tmp_path / "recent" / "frontier.json").read_text())["nodes"]
    assert _cli(stack, "audit", "verify", "--offline", str(tmp_path / "recent")).returncode == 0


def test_the_cli_shows_searches_proves_and_answers_subject_requests(stack: Stack) -> None:
    set_retention = _cli(stack, "tenants", "set", "acme", "--retain-payloads", "30d", "--json")
    assert set_retention.returncode == 0, set_retention.stderr
    assert json.loads(set_retention.stdout)["retain_payloads_s"] == 30 * 86_400
    event = _decide(stack, "acme", "erin")
    wait_until(lambda: _cli(stack, "audit", "show", event).returncode == 0, 20, "the decision to be logged")
    shown = _cli(stack, "audit", "show", event)
    assert "payload: kept" in shown.stdout
    found = _cli(stack, "audit", "search", "--tenant", "acme", "--subject", "erin", "--since", "1h", "--json")
    assert [e["event"]["id"] for e in json.loads(found.stdout)["events"]] == [event]
    assert _cli(stack, "audit", "search", "--kind", "nonsense").returncode == 2
    wait_until(lambda: _cli(stack, "audit", "proof", event).returncode == 0, 20, "a checkpoint covering the decision")
    assert "verified here" in _cli(stack, "audit", "proof", event).stdout
    access = _cli(stack, "subjects", "export", "-", "--tenant", "acme", stdin="erin\n")
    report = json.loads(access.stdout)
    assert [d["event"]["id"] for d in report["decisions"]] == [event]
    assert report["decisions"][0]["payload"]["state"] == "kept"
    erased = _cli(stack, "subjects", "erase", "erin", "--tenant", "acme", "--json")
    assert erased.returncode == 0, erased.stderr
    assert json.loads(erased.stdout)["keys_destroyed"] >= 1
    assert "payload: erased" in _cli(stack, "audit", "show", event).stdout
    assert _cli(stack, "tenants", "set", "acme", "--retain-payloads", "none", "--json").returncode == 0
    assert _cli(stack, "tenants", "set", "acme", "--retain-payloads", "forever").returncode == 2


def test_changing_a_tenants_retention_needs_the_audit_scope(stack: Stack) -> None:
    keys_only = stack.admin.create_key("operators", "keys only", scopes=["keys"])["key"]
    with _client(stack, keys_only) as http:
        refused = http.put("/admin/v1/tenants/globex", json={"retain_payloads_s": 86_400})
        assert refused.status_code == 403 and "'audit'" in refused.json()["detail"]
        assert http.put("/admin/v1/tenants/globex", json={"limits": {}}).status_code == 200
        assert http.post("/admin/v1/audit/search", json={}).status_code == 403
