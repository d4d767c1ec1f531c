"""The admin API's edge (issue 11, findings 3 and 4): no body is read before the caller is known,
JSON admin bodies are bounded (uploads keep their own bound), and Redis memory is bounded and
watched by the control plane."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from bastion import demo, problems
from bastion.errors import Overloaded, Unavailable
from tests.support import Stack, running, wait_until

JSON_LIMIT = 1024  # the smallest max_admin_body_bytes: a demo-sized upload is already past it


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Only the control plane and Redis, with the JSON admin limit at 1 KiB and a fast memory watch."""
    with running(
        tmp_path_factory.mktemp("admin-edge"),
        workers=0,
        gateways=0,
        max_admin_body_bytes=JSON_LIMIT,
        snapshot_refresh_s=0.2,
        log_level="info",
    ) as s:
        yield s


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _raw_post(stack: Stack, path: str, body_bytes: int, authorization: str | None) -> tuple[bytes, float]:
    """POST a ``body_bytes`` JSON array of zeros (Content-Length declared) over a raw socket, the
    body sent by a second thread while this one reads the answer, as an attacker's client would;
    the answer's bytes and how long it took."""
    port = int(stack.control_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {body_bytes}\r\n{auth}\r\n"
    )
    chunk = b"0," * (1 << 19)  # 1 MiB of array items

    def send_body() -> None:
        with_brackets = body_bytes - 2
        try:
            sock.sendall(head.encode() + b"[")
            sent = 0
            while sent + len(chunk) <= with_brackets:
                sock.sendall(chunk)
                sent += len(chunk)
            sock.sendall(b"0," * ((with_brackets - sent) // 2 - 1) + b"00]")
        except OSError:
            pass  # the server closed the connection: it will not read the rest

    started = time.perf_counter()
    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except OSError:
        pass
    took = time.perf_counter() - started
    sock.close()
    sender.join(30)
    return answer, took


def test_an_unauthenticated_64_mb_json_body_is_refused_unread(control: Stack) -> None:
    """401 at once; the control plane neither buffers nor parses the body (its peak RSS grows
    by less than 50 MB) and its /healthz keeps answering meanwhile."""
    pid = control.procs["control"].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _kib(pid, "VmRSS")
    health: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=control.control_url, timeout=30) as http:
            while not stop.is_set():
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                health.append(time.perf_counter() - started)
                time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        answer, took = _raw_post(control, "/admin/v1/keys", 64 << 20, None)
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join(30)
    grown_mb = (_kib(pid, "VmHWM") - before) / 1024
    print(f"unauthenticated 64 MB body: answered in {took * 1000:.0f} ms, control plane peak RSS +{grown_mb:.1f} MB")
    print(f"/healthz meanwhile: {len(health)} answers, slowest {max(health) * 1000:.0f} ms")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"application/problem+json" in answer and b"connection: close" in answer.lower()
    assert grown_mb < 50, f"the control plane grew by {grown_mb:.0f} MB"
    assert took < 5, f"refused after {took:.1f} s"
    assert health and max(health) < 2.0, f"/healthz took up to {max(health):.2f} s"


def test_a_wrong_key_gets_the_same_401_whatever_the_body_or_the_key(control: Stack) -> None:
    """An unknown key, a revoked one, a malformed one and no key: 401 with the same problem for
    an empty, a small and a 4 MB body, declared or chunked (no oracle, no body read)."""
    revoked = control.admin.create_key("operators", "soon-revoked", scopes=["keys"])
    control.admin.revoke_key(revoked["id"])
    unknown = "bst_000000000000_" + "x" * 43
    answers: dict[tuple[str, str], tuple[int, Any]] = {}
    with httpx.Client(base_url=control.control_url, timeout=30) as http:
        for label, key in (("unknown", unknown), ("revoked", revoked["key"])):
            for size in ("empty", "small", "4 MB", "chunked"):
                body: Any = {"empty": b"", "small": b'{"tenant": "acme"}', "4 MB": b" " * (4 << 20)}.get(size)
                if size == "chunked":
                    body = iter([b"[", b"0," * (1 << 20), b"0]"])
                r = http.post(
                    "/admin/v1/keys",
                    content=body,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                answers[(label, size)] = (r.status_code, r.json())
                assert r.headers["www-authenticate"].startswith("Bearer")
    assert {status for status, _ in answers.values()} == {401}, answers
    assert len({str(problem) for _, problem in answers.values()}) == 1, answers


def test_a_json_admin_body_past_max_admin_body_bytes_is_413_declared_or_chunked(control: Stack) -> None:
    headers = {"Authorization": f"Bearer {control.admin_key}", "Content-Type": "application/json"}
    big = b'{"tenant": "acme", "name": "' + b"x" * (2 * JSON_LIMIT) + b'"}'
    with httpx.Client(base_url=control.control_url, headers=headers, timeout=30) as http:
        declared = http.post("/admin/v1/keys", content=big)
        chunked = http.post("/admin/v1/keys", content=iter([big[:100], big[100:]]))
        small = http.post("/admin/v1/keys", json={"tenant": "acme", "name": "fits"})
        small_chunked = http.post("/admin/v1/keys", content=iter([b'{"tenant": "acme", ', b'"name": "fits too"}']))
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert "max_admin_body_bytes" in r.json()["detail"]
    assert small.status_code == 201, small.text
    assert small_chunked.status_code == 201, small_chunked.text


def test_a_body_sent_to_a_route_outside_admin_is_refused_413_declared_or_chunked(control: Stack) -> None:
    """Health, readiness and metrics take no body: a chunked or declared one is a 413 problem with
    ``Connection: close`` (not buffered, not routed), and the routes still answer without one."""
    with httpx.Client(base_url=control.control_url, timeout=30) as http:
        chunked = http.post("/healthz", content=iter([b"[", b"0," * (256 << 10), b"0]"]))
        declared = http.post("/readyz", content=b"x" * 10)
        assert http.get("/healthz").status_code == 200
    for r in (chunked, declared):
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["connection"] == "close"
        assert "takes no request body" in r.json()["detail"]


class _Registry:
    """The registry seam of a fake control plane: ``key_by_secret`` raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def key_by_secret(self, token: str) -> dict[str, Any] | None:
        raise self.error


def _through_gate(
    tmp_path: Path, path: str, headers: list[tuple[bytes, bytes]], error: Exception | None = None
) -> tuple[int, dict[bytes, bytes], dict[str, Any], int, bool]:
    """One POST through ``AdminGate`` in-process: (status, headers, problem, receive calls, routed)."""
    from bastion.control.gate import AdminGate
    from bastion.settings import Settings

    routed = False
    receives = 0
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal routed
        routed = True

    async def receive() -> dict[str, Any]:
        nonlocal receives
        receives += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    plane = SimpleNamespace(settings=Settings(data_dir=tmp_path), registry=_Registry(error or RuntimeError()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "app": SimpleNamespace(state=SimpleNamespace(control=plane)),
    }
    asyncio.run(AdminGate(app, max_json_bytes=1 << 20)(scope, receive, send))
    if not sent:
        return 0, {}, {}, receives, routed
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), orjson.loads(body), receives, routed


def test_the_gate_refuses_a_body_outside_admin_without_reading_it(tmp_path: Path) -> None:
    """A chunked body to /healthz is not buffered (up to 1 MiB, as a JSON admin body would be)
    before routing: the gate answers 413 without a single ``receive``."""
    for framing in ((b"transfer-encoding", b"chunked"), (b"content-length", b"5")):
        status, headers, problem, receives, routed = _through_gate(tmp_path, "/healthz", [framing])
        assert (status, receives, routed) == (413, 0, False), framing
        assert headers[b"connection"] == b"close"
        assert problem["status"] == 413
    assert _through_gate(tmp_path, "/healthz", [])[4], "a request without a body is routed"


def test_an_admin_request_the_gate_cannot_authenticate_for_sql_is_503_and_a_crash_a_bare_500(tmp_path: Path) -> None:
    """The gate sits outside the problem handlers: SQL away while resolving the key is its own
    problem (503, ``Retry-After``), not a 500; an unexpected error is a bare 500 problem that
    names nothing of it; both close a connection that declared a body."""
    key = [(b"authorization", b"Bearer bst_000000000000_" + b"x" * 43), (b"content-length", b"5")]
    status, headers, problem, receives, routed = _through_gate(
        tmp_path, "/admin/v1/keys", key, Unavailable("the registry database is unreachable", retry_after=2)
    )
    assert (status, problem["status"], receives, routed) == (503, 503, 0, False), problem
    assert headers[b"retry-after"] == b"2" and headers[b"connection"] == b"close"
    status, headers, problem, receives, routed = _through_gate(
        tmp_path, "/admin/v1/keys", key, RuntimeError("secret internals")
    )
    assert (status, problem["status"], receives, routed) == (500, 500, 0, False), problem
    assert "secret" not in str(problem) and headers[b"connection"] == b"close"
    assert headers[b"content-type"] == b"application/problem+json"


def test_an_artifact_check_that_finds_every_slot_taken_is_refused_503_after_wait_s() -> None:
    """The checks' semaphore is waited on by threadpool threads, which the gate's key lookups need
    too: a check that finds every slot taken waits ``wait_s`` at most, then is refused 503 with
    ``Retry-After`` instead of holding its thread until a slot frees."""
    from bastion.artifacts.sandbox import SandboxedCheck

    check = SandboxedCheck(concurrency=1, wait_s=0.3)
    assert check._slots.acquire(timeout=1)  # the one slot: a check running elsewhere
    try:
        started = time.monotonic()
        with pytest.raises(Overloaded, match="another artifact check is running; retry") as refused:
            check(demo.model_bytes(), 1 << 30)
        waited = time.monotonic() - started
    finally:
        check._slots.release()
    assert 0.25 <= waited < 5, waited
    assert refused.value.retry_after >= 1
    assert problems.status_of(refused.value) == 503
    assert check(demo.model_bytes(), 1 << 30).inputs[0].name == "input", "the slot is free again"


def _bigger_model(initializer_floats: int) -> bytes:
    """A valid ONNX model (y = x + w) whose initializer ``w`` holds ``initializer_floats`` floats."""
    w = numpy_helper.from_array(np.arange(initializer_floats, dtype=np.float32).reshape(1, -1), name="w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "bigger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", initializer_floats])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", initializer_floats])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_an_artifact_upload_keeps_max_upload_bytes_not_the_json_limit(control: Stack) -> None:
    data = _bigger_model(16_384)  # 64 KiB of weights: 64 x max_admin_body_bytes here
    assert len(data) > 64 * JSON_LIMIT
    assert len(demo.model_bytes()) > JSON_LIMIT  # the stack registered it at start, too
    view = control.admin.register("bigger-model", data)
    assert view["version"] == 1


def test_the_embedded_redis_is_bounded_and_never_evicts(control: Stack) -> None:
    client = control.redis_client()
    try:
        assert client.config_get("maxmemory")["maxmemory"] == str(1024 << 20)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        client.close()


def _gauge(stack: Stack, name: str) -> float:
    for line in httpx.get(f"{stack.control_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the control plane's /metrics")


def test_redis_memory_past_the_alert_line_is_exported_logged_and_reported(control: Stack) -> None:
    client = control.redis_client()
    bound = 32 << 20
    try:
        client.config_set("maxmemory", bound)
        wait_until(lambda: _gauge(control, "bastion_redis_memory_max_bytes") == bound, 20, "the new bound")
        assert _gauge(control, "bastion_redis_memory_high") == 0
        for i in range(28):  # 28 MiB of filler: past 0.8 x 32 MiB
            client.set(f"test:filler:{i}", b"f" * (1 << 20), ex=600)
        wait_until(lambda: _gauge(control, "bastion_redis_memory_high") == 1, 20, "the memory alert")
        assert _gauge(control, "bastion_redis_memory_used_bytes") > 0.8 * bound
        ready = httpx.get(f"{control.control_url}/readyz", timeout=10)
        assert ready.status_code == 200, "a full Redis is an alarm, not an unready control plane"
        assert ready.json()["checks"]["redis_memory"]["state"] == "high"
        client.delete(*(f"test:filler:{i}" for i in range(28)))
        wait_until(lambda: _gauge(control, "bastion_redis_memory_high") == 0, 20, "the alert to clear")
        client.config_set("maxmemory", 0)
        wait_until(lambda: "redis_maxmemory_unset" in control.log("control"), 20, "the unbounded warning")
    finally:
        client.config_set("maxmemory", 1024 << 20)
        client.close()
    log = control.log("control")
    assert log.count("redis_memory_high") == 1 and log.count("redis_memory_ok") == 1, log[-2000:]
    assert log.count("redis_maxmemory_unset") == 1
