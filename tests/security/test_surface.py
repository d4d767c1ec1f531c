"""The attack surface read from the OpenAPI documents: route x scope matrix, tenant isolation on every
object route, JSON bombs, docs off by default."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion import openaierrors
from bastion.constants import SCOPES
from tests.support import Stack, running

ROW = [1.0] * 30
PUBLIC = {"/healthz", "/readyz", "/v2", "/v2/health/live", "/v2/health/ready"}
FILL = {"name": "breast-cancer", "job_id": "no-such-job", "version": "99", "key_id": "no-such-key"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("surface"), workers=1, gateways=1) as s:
        yield s


def _documents(stack: Stack) -> dict[str, dict[str, Any]]:
    """Both OpenAPI documents, as the two servers would serve them."""
    from bastion.control.app import create_app as control_app
    from bastion.gateway.app import create_app as gateway_app

    return {"gateway": gateway_app(stack.settings).openapi(), "control": control_app(stack.settings).openapi()}


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in {"get", "post", "put", "delete", "patch"}:
                yield method, path, op


def _call(http: httpx.Client, method: str, path: str, model: str) -> httpx.Response:
    url = path
    for name, value in {**FILL, "name": model}.items():
        url = url.replace("{" + name + "}", value)
    if method in {"post", "put"}:
        body = {"inputs": [ROW]} if url.endswith(("/predict", "/jobs")) else {}
        return http.request(method.upper(), url, json=body)
    return http.request(method.upper(), url)


def test_every_route_refuses_every_scope_it_should(stack: Stack) -> None:
    keys = {scope: stack.admin.create_key("operators", f"only-{scope}", scopes=[scope])["key"] for scope in SCOPES}
    tenant_all = stack.admin.create_key("acme", "all-but-admin", scopes=[s for s in SCOPES if s != "admin"])["key"]
    time.sleep(0.5)
    checked = 0
    covered: set[tuple[str, str]] = set()
    for server, doc in _documents(stack).items():
        base = stack.gateway if server == "gateway" else stack.control_url
        model = "breast-cancer" if server == "gateway" else "matrix-nobody"  # control: no side effects
        for method, path, op in _operations(doc):
            if path in PUBLIC:
                continue
            declared = op.get("x-bastion-scopes")
            assert declared, f"{method.upper()} {path} declares no scopes"
            for scope, key in keys.items():
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
                    r = _call(http, method, path, model)
                where = f"{server} {method.upper()} {path} with scope {scope}: {r.status_code} {r.text[:120]}"
                if scope in declared:
                    assert r.status_code not in (401, 403), where
                    assert r.status_code < 500, where
                elif server == "gateway" and scope == "admin":
                    assert r.status_code == 401, where  # admin keys never reach a gateway
                else:
                    assert r.status_code == 403, where
                    if path.startswith("/v2/"):  # the Open Inference Protocol's own error shape
                        assert r.headers["content-type"] == "application/json", where
                        assert set(r.json()) == {"error"}, where
                    elif openaierrors.covers(path):  # the OpenAI routes' own error shape
                        assert r.headers["content-type"] == "application/json", where
                        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, where
                    else:
                        assert r.headers["content-type"] == "application/problem+json", where
                checked += 1
                covered.add((method, path))
            if server == "control":  # tenants' keys never reach the admin API, whatever their scopes
                with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tenant_all}"}) as http:
                    r = _call(http, method, path, model)
                assert r.status_code == 403 and "'operators' tenant" in r.json()["detail"], (path, r.text)
    print(f"route x scope matrix: {checked} pairs checked")
    assert checked > 250
    assert {  # every Open Inference Protocol route that takes credentials is in the matrix
        ("get", "/v2/models/{name}"),
        ("get", "/v2/models/{name}/ready"),
        ("get", "/v2/models/{name}/versions/{version}"),
        ("get", "/v2/models/{name}/versions/{version}/ready"),
        ("post", "/v2/models/{name}/infer"),
        ("post", "/v2/models/{name}/versions/{version}/infer"),
    } <= covered


def test_every_object_route_is_visible_only_inside_its_tenant(stack: Stack) -> None:
    with stack.client("acme") as acme:
        job = acme.post("/v1/models/breast-cancer/jobs", json={"inputs": [ROW]}).json()["id"]
    object_routes = [(m, p) for m, p, _ in _operations(_documents(stack)["gateway"]) if "{job_id}" in p and m == "get"]
    assert len(object_routes) >= 2
    with stack.client("acme") as acme, stack.client("globex") as other:
        for _method, path in object_routes:
            url = path.replace("{job_id}", job)
            if path.endswith("/events"):
                with acme.stream("GET", url) as mine:
                    assert mine.status_code == 200
                with other.stream("GET", url) as theirs:
                    assert theirs.status_code == 404
                continue
            assert acme.get(url).status_code == 200
            theirs = other.get(url)
            missing = other.get(path.replace("{job_id}", "x" * len(job)))
            assert theirs.status_code == 404, path
            # No oracle: another tenant's job looks exactly like one that does not exist.
            assert theirs.text.replace(job, "x" * len(job)) == missing.text, path


def test_json_bombs_are_refused_quickly(stack: Stack) -> None:
    bombs = {
        "deep nesting": b"[" * 200_000 + b"]" * 200_000,
        "huge flat array": b'{"inputs": [' + b",".join([b"1"] * 400_000) + b"]}",
        "long string": b'{"inputs": "' + b"A" * 900_000 + b'"}',
        "many keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(80_000)) + b"}",
        "huge number": b'{"inputs": [[' + b"9" * 5000 + b"]]}",
        "oversized": b'{"inputs": [' + b"1," * 3_000_000 + b"1]}",
    }
    with stack.client() as http:
        for name, body in bombs.items():
            started = time.perf_counter()
            r = http.post(
                "/v1/models/breast-cancer/predict", content=body, headers={"Content-Type": "application/json"}
            )
            took = time.perf_counter() - started
            assert r.status_code in (400, 413), (name, r.status_code, r.text[:200])
            assert r.headers["content-type"] == "application/problem+json", name
            assert took < 2.0, (name, took)
        assert http.post("/v1/models/breast-cancer/predict", json={"inputs": [ROW]}).status_code == 200


def test_docs_and_cors_are_off_unless_enabled(stack: Stack) -> None:
    for base in (stack.gateway, stack.control_url):
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert httpx.get(f"{base}{path}").status_code == 404
    r = httpx.options(
        f"{stack.gateway}/v1/models/breast-cancer/predict",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    answer = httpx.get(f"{stack.gateway}/healthz")
    assert answer.headers["x-content-type-options"] == "nosniff"


def test_cors_allows_only_the_configured_origins(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = Stack(tmp_path_factory.mktemp("cors"), cors_origins="https://app.example")
    try:
        s.start()
        url = f"{s.gateway}/v1/models/breast-cancer/predict"
        for origin, allowed in (("https://app.example", True), ("https://evil.example", False)):
            r = httpx.options(
                url,
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert (r.headers.get("access-control-allow-origin") == origin) is allowed, (origin, r.headers)
        with s.client(headers={"Origin": "https://app.example"}) as http:
            answer = http.post("/v1/models/breast-cancer/predict", json={"inputs": [ROW]})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-bastion-model-version" in answer.headers["access-control-expose-headers"].lower()
    finally:
        s.stop()
