"""Hostile and malformed input gets a 4xx saying what was wrong - problem+json on our routes, the Open
Inference Protocol's ``{"error": ...}`` under ``/v2`` (tests/test_oip_http.py has the rest): no 5xx, no hang."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support import Stack

ROW = [1.0] * 30
PREDICT = "/v1/models/breast-cancer/predict"
INFER = "/v2/models/breast-cancer/infer"


def _problem(r: httpx.Response, status: int, says: str) -> dict[str, Any]:
    """A problem (RFC 9457), or under /v2 an OIP error, with ``status`` and saying ``says``."""
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    body: dict[str, Any] = r.json()
    if r.request.url.path.startswith("/v2/"):
        assert r.headers["content-type"] == "application/json"
        assert set(body) == {"error"}
        assert says.lower() in body["error"].lower(), body["error"]
        return body
    assert r.headers["content-type"] == "application/problem+json"
    assert body["status"] == status
    assert says.lower() in body["detail"].lower(), body["detail"]
    return body


CASES = [
    ("wrong shape", PREDICT, {"inputs": [[1.0] * 29]}, 400, "shape [N, 30]"),
    ("wrong rank", PREDICT, {"inputs": ROW}, 400, "2 dimensions"),
    ("ragged rows", PREDICT, {"inputs": [ROW, [1.0] * 3]}, 400, "rectangular"),
    ("strings", PREDICT, {"inputs": [["1.0"] * 30]}, 400, "got strings"),
    ("booleans", PREDICT, {"inputs": [[True] * 30]}, 400, "got booleans"),
    ("a boolean among numbers", PREDICT, {"inputs": [[True] + [1.0] * 29]}, 400, "got booleans"),
    ("null", PREDICT, {"inputs": [[None] * 30]}, 400, "float32"),
    ("object row", PREDICT, {"inputs": [{"a": 1}]}, 400, "float32"),
    ("missing key", PREDICT, {"rows": [ROW]}, 400, "unknown fields"),
    ("empty body object", PREDICT, {}, 400, "missing the required field 'inputs'"),
    ("not an object", PREDICT, [ROW], 400, "must be a JSON object"),
    ("no rows", PREDICT, {"inputs": []}, 400, "dimensions"),
    ("too large for float32", PREDICT, {"inputs": [[1e39] * 30]}, 400, "not a finite"),
    ("unknown named input", PREDICT, {"inputs": {"x": [ROW]}}, 400, "missing ['input']"),
    (
        "v2 wrong datatype",
        INFER,
        {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "INT64", "data": ROW}]},
        400,
        "datatype FP32",
    ),
    (
        "v2 shape mismatch",
        INFER,
        {"inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP32", "data": ROW}]},
        400,
        "do not fill shape",
    ),
    ("v2 missing data", INFER, {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32"}]}, 400, "'data'"),
    (
        "v2 unknown input",
        INFER,
        {"inputs": [{"name": "nope", "shape": [1, 30], "datatype": "FP32", "data": ROW}]},
        400,
        "unknown input",
    ),
    (
        "v2 negative shape",
        INFER,
        {"inputs": [{"name": "input", "shape": [-1, 30], "datatype": "FP32", "data": ROW}]},
        400,
        "non-negative",
    ),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "says"), CASES, ids=[c[0] for c in CASES])
def test_invalid_json_payloads_are_refused(
    stack: Stack, case: str, path: str, body: Any, status: int, says: str
) -> None:
    with stack.client() as http:
        _problem(http.post(path, json=body), status, says)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "nan"])
def test_nan_and_infinity_are_refused(stack: Stack, literal: str) -> None:
    """JSON has no NaN or Infinity; a body carrying them is refused before anything is queued."""
    raw = '{"inputs": [[' + ", ".join([literal] + ["1.0"] * 29) + "]]}"
    with stack.client() as http:
        _problem(http.post(PREDICT, content=raw, headers={"Content-Type": "application/json"}), 400, "not valid JSON")


def test_huge_exponent_is_refused(stack: Stack) -> None:
    raw = '{"inputs": [[' + ", ".join(["1e400"] + ["1.0"] * 29) + "]]}"
    with stack.client() as http:
        r = http.post(PREDICT, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"


def test_unknown_model_is_404(stack: Stack) -> None:
    with stack.client() as http:
        _problem(http.post("/v1/models/no-such-model/predict", json={"inputs": [ROW]}), 404, "no model")
        _problem(http.post("/v2/models/no-such-model/infer", json={"inputs": []}), 404, "no model")
        _problem(http.get("/v2/models/no-such-model"), 404, "no model")


def test_ten_megabyte_body_is_refused_before_reading(stack: Stack) -> None:
    body = b'{"inputs": [[' + b"1.0," * (10 * 1024 * 1024 // 4) + b"1.0]]}"
    with stack.client() as http:
        _problem(http.post(PREDICT, content=body, headers={"Content-Type": "application/json"}), 413, "limit")


def test_chunked_oversized_body_is_refused(stack: Stack) -> None:
    """A body without Content-Length is counted as it arrives and cut off at the limit."""

    def chunks() -> Any:
        yield b'{"inputs": [['
        for _ in range(2048):
            yield b"1.0," * 256

    with stack.client() as http:
        r = http.post(PREDICT, content=chunks(), headers={"Content-Type": "application/json"})
    _problem(r, 413, "limit")


def test_deeply_nested_json_is_refused(stack: Stack) -> None:
    body = "[" * 100_000 + "]" * 100_000
    with stack.client() as http:
        r = http.post(PREDICT, content=body, headers={"Content-Type": "application/json"})
    _problem(r, 400, "not valid JSON")


def test_wrong_content_type_is_415(stack: Stack) -> None:
    with stack.client() as http:
        _problem(http.post(PREDICT, content=b"inputs=1", headers={"Content-Type": "text/plain"}), 415, "JSON")


def test_garbage_body_is_400(stack: Stack) -> None:
    with stack.client() as http:
        _problem(http.post(PREDICT, content=b"\xff\xfe{{", headers={"Content-Type": "application/json"}), 400, "JSON")


def test_missing_or_bad_key_is_401(stack: Stack) -> None:
    with httpx.Client(base_url=stack.gateway) as anon:
        _problem(anon.post(PREDICT, json={"inputs": [ROW]}), 401, "API key or token is required")
        r = anon.post(PREDICT, json={"inputs": [ROW]}, headers={"Authorization": "Bearer bst_nope_nope"})
        _problem(r, 401, "unknown")
        r = anon.post(PREDICT, json={"inputs": [ROW]}, headers={"Authorization": "Basic Zm9vOmJhcg=="})
        _problem(r, 401, "API key or token is required")


def test_another_tenants_job_is_404(stack: Stack) -> None:
    """A job id is visible only to the tenant that created it; for others it does not exist."""
    with stack.client("acme") as acme, stack.client("globex") as globex:
        job = acme.post("/v1/models/breast-cancer/jobs", json={"inputs": [ROW]}).json()
        assert acme.get(f"/v1/jobs/{job['id']}").status_code == 200
        _problem(globex.get(f"/v1/jobs/{job['id']}"), 404, "no such job")
        _problem(globex.get(f"/v1/jobs/{job['id']}/events"), 404, "no such job")
        _problem(acme.get("/v1/jobs/not-a-real-job"), 404, "no such job")
        _problem(acme.get("/v1/jobs/" + "x" * 500), 404, "no such job")


@pytest.mark.parametrize("value", ["soon", "0.001", "0", "-5", "99999999"])
def test_bad_timeout_header_is_400(stack: Stack, value: str) -> None:
    with stack.client() as http:
        r = http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Timeout-Ms": value})
        _problem(r, 400, "X-Bastion-Timeout-Ms")


def test_unknown_route_and_method_are_problems(stack: Stack) -> None:
    with stack.client() as http:
        _problem(http.get("/v1/nothing-here"), 404, "no route")
        r = http.get(PREDICT)
        assert r.status_code == 405
        assert r.headers["content-type"] == "application/problem+json"


def test_the_stack_still_serves_after_the_abuse(stack: Stack) -> None:
    """Nothing above crashed a process: a normal request still succeeds."""
    with stack.client() as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} exited"
