"""Per-model serving options (default deadline, queue limits, response cache) and gateway draining."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bastion.embedded.redis_server import free_port
from tests.support import Stack, http_ok, running, wait_until

MODEL = "breast-cancer"
PREDICT = f"/v1/models/{MODEL}/predict"
JOBS = f"/v1/models/{MODEL}/jobs"
ROW = [1.0] * 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("serving")) as s:
        yield s


@pytest.fixture
def frozen(stack: Stack) -> Iterator[None]:
    """The only worker stopped (SIGSTOP): whatever is queued waits."""
    stack.signal("worker-0", signal.SIGSTOP)
    try:
        yield
    finally:
        stack.signal("worker-0", signal.SIGCONT)
        stack.admin.set_serving(MODEL, {})
        time.sleep(0.3)


def test_serving_options_are_validated_and_shown(stack: Stack) -> None:
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as admin:
        for bad in ({"timeout_s": -1}, {"cache_ttl_s": 10**9}, {"max_queue_sync": 0}, {"colour": "red"}):
            r = admin.put(f"/admin/v1/models/{MODEL}/serving", json=bad)
            assert 400 <= r.status_code < 500 and r.headers["content-type"] == "application/problem+json", r.text
    shown = stack.admin.set_serving(MODEL, {"timeout_s": 2.5, "cache_ttl_s": 5})
    assert shown["serving"] == {"timeout_s": 2.5, "max_queue_sync": None, "max_queue_batch": None, "cache_ttl_s": 5}
    assert stack.admin.serving(MODEL) == shown
    stack.admin.set_serving(MODEL, {})


def test_the_model_default_deadline_applies_without_a_header(stack: Stack, frozen: None) -> None:
    stack.admin.set_serving(MODEL, {"timeout_s": 0.3})
    time.sleep(0.3)
    with stack.client() as http:
        t0 = time.perf_counter()
        r = http.post(PREDICT, json={"inputs": [ROW]})
        took = time.perf_counter() - t0
    assert r.status_code == 504, r.text
    assert took < 5, "the model's 0.3 s default, not the 30 s process default"


def test_a_full_model_queue_refuses_at_once_with_retry_after(stack: Stack, frozen: None) -> None:
    stack.admin.set_serving(MODEL, {"max_queue_sync": 5, "max_queue_batch": 3})
    time.sleep(0.3)
    with stack.client() as http, ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(
                lambda _: http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Timeout-Ms": "1500"}),
                range(20),
            )
        )
        jobs = [http.post(JOBS, json={"inputs": [ROW]}) for _ in range(5)]
    refused = [r for r in answers if r.status_code == 503]
    assert len(refused) == 15 and {r.status_code for r in answers} == {503, 504}
    assert all("retry-after" in r.headers and MODEL in r.json()["detail"] for r in refused)
    assert [r.status_code for r in jobs] == [202, 202, 202, 503, 503]


def test_the_response_cache_is_per_tenant_and_labelled(stack: Stack) -> None:
    stack.admin.set_serving(MODEL, {"cache_ttl_s": 30})
    time.sleep(0.3)
    other_row = [2.0] * 30
    try:
        with stack.client("acme") as acme, stack.client("globex") as globex:
            first = acme.post(PREDICT, json={"inputs": [ROW]})
            again = acme.post(PREDICT, json={"inputs": [[1, 1.0, *[1.0] * 28]]})  # same numbers, other spelling
            theirs = globex.post(PREDICT, json={"inputs": [ROW]})
            other = acme.post(PREDICT, json={"inputs": [other_row]})
        assert first.status_code == again.status_code == theirs.status_code == other.status_code == 200
        assert "x-bastion-cache" not in first.headers
        assert again.headers["x-bastion-cache"] == "hit" and again.json()["outputs"] == first.json()["outputs"]
        assert "x-bastion-cache" not in theirs.headers, "another tenant never reads acme's entries"
        assert "x-bastion-cache" not in other.headers
        client = stack.redis_client()
        keys = sorted(k.decode() for k in client.scan_iter("rc:*"))
        assert len(keys) == 3 and sum(k.startswith("rc:acme:") for k in keys) == 2
        assert all(0 < client.ttl(k) <= 30 for k in keys)
        client.close()
    finally:
        stack.admin.set_serving(MODEL, {})


def test_a_gateway_draining_reports_not_ready_and_still_answers(stack: Stack) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack._spawn("gateway-drain", ["gateway"], {"BASTION_GATEWAY_PORT": str(port), "BASTION_DRAIN_S": "1.5"})
    wait_until(lambda: http_ok(f"{url}/readyz"), 60, "the extra gateway")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {stack.keys['acme']}"}) as http:
        stack.signal("gateway-drain", signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        ready = http.get("/readyz")
        served = http.post(PREDICT, json={"inputs": [ROW]})
    assert ready.status_code == 503 and ready.json()["checks"]["draining"] is True
    assert served.status_code == 200, "requests are still answered while draining"
    # uvicorn re-raises the captured SIGTERM once it has shut down: the exit status says so
    assert stack.wait("gateway-drain", 20) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled >= 1.4, "it kept serving for the drain time before stopping"
