"""Logs: redacted after exceptions are formatted, carrying the request id, quiet on disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import structlog

from bastion import logs
from tests.support import Stack, running

KEY_ID = "1cd4b6d0d94d"
KEY_SECRET = "nsPO7OKBq3vXy0_T-5aZ9cW2eR4tY6uI8oP1aS3dF5g"
API_KEY = f"bst_{KEY_ID}_{KEY_SECRET}"
JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJzdWIiOiJhbGljZSIsInRlbmFudCI6ImFjbWUifQ.c2lnbmF0dXJlLWJ5dGVz"
MARKER = 98765.4321  # a recognisable input value


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logging configured to write to a string, as ``configure`` does for a process."""
    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    with contextlib.redirect_stderr(out):  # configure binds the stream it finds
        logs.configure("debug", "test")
    yield out
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level = before[0], before[1]


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_an_exception_message_with_a_key_and_a_jwt_is_redacted_in_the_traceback(captured: io.StringIO) -> None:
    """A traceback is formatted before redaction: an API key's secret and a JWT in the exception
    message never reach the output, the key's public id and the key_id field stay readable."""
    log = logs.get("test")
    try:
        raise ValueError(f"refused {API_KEY} and Authorization: Bearer {JWT}")
    except ValueError as exc:
        log.error("boom", key_id=KEY_ID, exc_info=exc)
    text = captured.getvalue()
    assert "Traceback" in text and "ValueError" in text
    assert KEY_SECRET not in text and JWT not in text and JWT.split(".")[1] not in text
    assert "[redacted]" in text
    [line] = _lines(captured)
    assert line["key_id"] == KEY_ID
    assert f"bst_{KEY_ID}_[redacted]" in str(line["exception"])


def test_standard_library_records_go_through_the_same_redaction(captured: io.StringIO) -> None:
    """uvicorn's and asyncio's records (the standard library's logging) are JSON and redacted too."""
    try:
        raise RuntimeError(f"token was {JWT}")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application %s", API_KEY)
    text = captured.getvalue()
    assert KEY_SECRET not in text and JWT not in text
    [line] = _lines(captured)
    assert line["logger"] == "uvicorn.error" and "RuntimeError" in str(line["exception"])


def test_secret_and_payload_fields_are_redacted_at_any_depth_by_normalised_name(captured: io.StringIO) -> None:
    """Field names match by substring (api_key_plain, x-authorization) or as payload names (inputs,
    data), inside nested dicts and lists; strings that are credentials are caught whatever their
    field; ids, digests and numbers stay."""
    digest = "ab" * 32
    logs.get("test").info(
        "nested",
        api_key_plain=KEY_SECRET,
        request={"headers": {"x-authorization": "opaque-value-1", "X-Api-Key": "opaque-value-2"}},
        jobs=[{"job_id": "j1", "inputs": [[MARKER]]}, {"job_id": "j2", "data": {"x": MARKER}}],
        note=f"caller sent {API_KEY}",
        forwarded=["Bearer " + "t" * 40, JWT],
        key_id=KEY_ID,
        digest=digest,
        rows=3,
    )
    text = captured.getvalue()
    for leaked in (KEY_SECRET, "opaque-value-1", "opaque-value-2", str(MARKER), JWT, "t" * 40):
        assert leaked not in text, leaked
    [line] = _lines(captured)
    assert line["api_key_plain"] == "[redacted]"
    assert line["request"] == {"headers": {"x-authorization": "[redacted]", "X-Api-Key": "[redacted]"}}
    assert line["jobs"] == [{"job_id": "j1", "inputs": "[redacted]"}, {"job_id": "j2", "data": "[redacted]"}]
    assert line["forwarded"] == ["Bearer [redacted]", "[redacted]"]
    assert (line["key_id"], line["digest"], line["rows"]) == (KEY_ID, digest, 3)


def test_a_log_line_written_inside_a_request_carries_its_request_id(captured: io.StringIO) -> None:
    """middleware.RequestId binds the request's id (the client's, or a generated one) to every
    line written while the request runs, fields bound with logs.bind join it, and none of it
    outlives the request."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from bastion import middleware

    log = logs.get("test")

    async def hello(request: Request) -> PlainTextResponse:
        logs.bind(tenant="acme", model="breast-cancer")
        log.info("inside")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/hello", hello)])
    middleware.install(app, max_body_bytes=1024)

    async def go() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            given = await http.get("/hello", headers={"X-Request-ID": "req-given-1"})
            generated = await http.get("/hello")
        log.info("after")
        return [given.headers["x-request-id"], generated.headers["x-request-id"]]

    given, generated = asyncio.run(go())
    lines = _lines(captured)
    inside = [line for line in lines if line["event"] == "inside"]
    assert given == "req-given-1"
    assert [line["request_id"] for line in inside] == [given, generated]
    assert all(line["tenant"] == "acme" and line["model"] == "breast-cancer" for line in inside)
    [after] = [line for line in lines if line["event"] == "after"]
    assert "request_id" not in after and "tenant" not in after and after["process"] == "test"


def test_a_client_that_disconnects_mid_body_is_not_an_unexpected_error(tmp_path: Path) -> None:
    """A real gateway: a client sends headers and 10 of its 1000 declared bytes, then closes. The
    gateway logs client_disconnected at info, with no traceback and no unexpected_error."""
    with running(tmp_path, log_level="info") as stack:
        url = urlsplit(stack.gateway)
        for _ in range(3):
            with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
                sock.sendall(
                    (
                        f"POST /v1/models/breast-cancer/predict HTTP/1.1\r\nHost: {url.netloc}\r\n"
                        f"Authorization: Bearer {stack.keys['acme']}\r\n"
                        "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                        '{"inputs":'
                    ).encode()
                )
                time.sleep(0.2)
        deadline = time.monotonic() + 10
        while "client_disconnected" not in stack.log("gateway-0") and time.monotonic() < deadline:
            time.sleep(0.05)
        with stack.client() as http:
            assert http.get("/readyz").status_code == 200
            text = stack.gateway_metrics()
        log = stack.log("gateway-0")
    assert "client_disconnected" in log
    assert "unexpected_error" not in log and "Traceback" not in log
    assert 'kind="client_disconnected"' in text and 'kind="unexpected"' not in text


def _error_paths(stack: Stack) -> None:
    """Requests that fail in different places, each carrying the key and the marker input."""
    key = stack.keys["acme"]
    auth = {"Authorization": f"Bearer {key}"}
    predict = f"{stack.gateway}/v1/models/breast-cancer/predict"
    row = [MARKER] * 30
    with httpx.Client(timeout=30) as http:
        http.post(predict, json={"inputs": [row]}, headers=auth)  # succeeds
        http.post(predict, json={"inputs": [row]}, headers={"Authorization": f"Bearer {key}x"})  # bad key
        http.post(predict, json={"inputs": [row]}, headers={"Authorization": f"Bearer {JWT}"})  # a JWT, no issuer
        http.post(predict, content=f'{{"inputs": [[{MARKER}, '.encode(), headers=auth)  # bad JSON
        http.post(predict, json={"inputs": [[MARKER] * 29]}, headers=auth)  # wrong shape
        http.post(predict, json={"inputs": [[MARKER, "x" * 3, *row[2:]]]}, headers=auth)  # wrong type
        http.post(predict, content=f'{{"inputs": [[{MARKER}, {", ".join(["1e309"] * 29)}]]}}'.encode(), headers=auth)
        http.post(predict, content=b'{"inputs": [[' + b"9" * 5000 + f", {MARKER}]]}}".encode(), headers=auth)
        http.post(predict, content=b"[" * 100_000, headers=auth)  # deep nesting
        http.post(predict, json={"inputs": [row] * 200_000}, headers=auth)  # oversized body
        http.post(f"{stack.gateway}/v1/models/breast-cancer/jobs", json={"inputs": [row]}, headers=auth)
        http.post(f"{stack.gateway}/v1/models/no-such-model/predict", json={"inputs": [row]}, headers=auth)
        http.post(f"{stack.gateway}/v2/models/breast-cancer/infer", content=f"{{{MARKER}".encode(), headers=auth)
        http.get(f"{stack.gateway}/v1/jobs/{key}", headers=auth)  # the key where an id goes


def test_no_key_or_input_reaches_the_logs_on_error_paths(tmp_path: Path) -> None:
    """Through a real stack at debug level: a good request, a bad key, a JWT, bad JSON, wrong shapes
    and types, huge numbers, deep nesting, an oversized body, a job, an unknown model - no log file
    holds the key, its secret, the JWT or the input value."""
    with running(tmp_path, log_level="debug", max_body_bytes=1_000_000) as stack:
        _error_paths(stack)
        time.sleep(1.0)  # the job runs, the worker logs
        key = stack.keys["acme"]
        files = {p.name: p.read_text(errors="replace") for p in stack.root.glob("*.log")}
    assert files and all(files.values()), "every process writes logs at debug"
    for name, text in files.items():
        for leaked in (key, key[len("bst_") + 13 :], JWT, JWT.split(".")[1], str(MARKER), stack.admin_key):
            assert leaked not in text, f"{leaked[:12]}... in {name}"
