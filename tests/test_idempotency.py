"""Idempotency-Key on job submission and predict: one job, whatever the retries and races."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.embedded.redis_server import free_port
from tests.support import Stack, running, wait_until

ROW = [1.0] * 30
JOBS = "/v1/models/breast-cancer/jobs"
PREDICT = "/v1/models/breast-cancer/predict"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("idem"), workers=1, gateways=2, worker_metrics_port=free_port()) as s:
        yield s


async def _together(stack: Stack, path: str, key: str, body: dict[str, Any], n: int = 100) -> list[httpx.Response]:
    """``n`` identical requests at once, alternating between the two gateways."""
    headers = {"Authorization": f"Bearer {stack.keys['acme']}", "Idempotency-Key": key}
    clients = [
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=200))
        for url in stack.gateway_urls
    ]
    try:
        return list(await asyncio.gather(*(clients[i % 2].post(path, json=body) for i in range(n))))
    finally:
        for c in clients:
            await c.aclose()


def _jobs_run(stack: Stack) -> float:
    text = httpx.get(f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics").text
    found = re.findall(r'bastion_worker_jobs_total\{model="breast-cancer",status="succeeded"\} ([0-9.e+]+)', text)
    return float(found[0]) if found else 0.0


def test_100_concurrent_predicts_with_one_key_run_one_job(stack: Stack) -> None:
    before = _jobs_run(stack)
    answers = asyncio.run(_together(stack, PREDICT, "predict-once", {"inputs": [ROW]}))
    assert {r.status_code for r in answers} == {200}
    assert len({r.json()["id"] for r in answers}) == 1
    assert len({str(r.json()["outputs"]) for r in answers}) == 1
    replayed = sum(r.headers.get("idempotent-replayed") == "true" for r in answers)
    time.sleep(0.3)
    ran = _jobs_run(stack) - before
    print(f"100 concurrent predicts, one Idempotency-Key: {ran:g} job run, {replayed} answers replayed")
    assert ran == 1 and replayed == 99


def test_100_concurrent_submissions_with_one_key_enqueue_one_job(stack: Stack) -> None:
    client = stack.redis_client()
    try:
        before = _jobs_run(stack)
        answers = asyncio.run(_together(stack, JOBS, "submit-once", {"inputs": [ROW, ROW]}))
        assert {r.status_code for r in answers} == {202}
        ids = {r.json()["id"] for r in answers}
        assert len(ids) == 1
        job = ids.pop()
        wait_until(lambda: client.hget(f"job:{job}", "status") == b"succeeded", 10, "the job to finish")
        time.sleep(0.3)
        ran = _jobs_run(stack) - before
        replayed = sum(r.headers.get("idempotent-replayed") == "true" for r in answers)
        print(f"100 concurrent submissions, one Idempotency-Key: {ran:g} job run, {replayed} answers replayed")
        assert ran == 1 and replayed == 99
        assert 0 < client.ttl(next(iter(client.scan_iter("idem:acme:*")))) <= 86_400
    finally:
        client.close()


def test_a_retry_later_gets_the_stored_outcome_and_a_different_body_is_422(stack: Stack) -> None:
    headers = {"Idempotency-Key": "order-7"}
    with stack.client(headers=headers) as http:
        first = http.post(PREDICT, json={"inputs": [ROW]})
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        again = http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Timeout-Ms": "50"})
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        other = http.post(PREDICT, json={"inputs": [[2.0] * 30]})
        assert other.status_code == 422 and other.headers["content-type"] == "application/problem+json"
        assert "already used for a different request" in other.json()["detail"]
        bad = http.post(PREDICT, json={"inputs": [ROW]}, headers={"Idempotency-Key": ""})
        assert bad.status_code == 400
    with stack.client("globex", headers=headers) as http:  # keys are per tenant
        assert "idempotent-replayed" not in http.post(PREDICT, json={"inputs": [ROW]}).headers


def test_an_expired_outcome_is_not_kept_so_a_retry_runs_again(tmp_path_factory: pytest.TempPathFactory) -> None:
    s = Stack(tmp_path_factory.mktemp("idem-expired"), workers=0)
    try:
        s.start()
        headers = {"Idempotency-Key": "slow-1", "X-Bastion-Timeout-Ms": "200"}
        with s.client(headers=headers) as http:
            assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 504
            client = s.redis_client()
            assert list(client.scan_iter("idem:*")) == []
            client.close()
            s.start_worker(0)
            wait_until(
                lambda: (
                    http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Timeout-Ms": "5000"}).status_code
                    == 200
                ),
                30,
                "the retry to run",
            )
    finally:
        s.stop()


def test_a_retry_on_another_gateway_after_the_first_was_killed_gets_the_first_answer(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The worker, not the gateway that waited, stores a sync outcome in the key's record: with
    that gateway SIGKILLed mid-request (and the job's own state long expired), a retry through
    the other gateway gets the first request's answer instead of waiting for one that never comes."""
    import signal
    import threading

    s = Stack(tmp_path_factory.mktemp("idem-crash"), workers=1, gateways=2, sync_result_ttl_s=1)
    try:
        s.start()
        client = s.redis_client()
        headers = {"Idempotency-Key": "crash-1", "X-Bastion-Timeout-Ms": "6000"}
        s.signal("worker-0", signal.SIGSTOP)  # the job waits in the queue while its gateway dies

        def first() -> None:
            with contextlib.suppress(httpx.HTTPError), s.client(gateway=0, headers=headers, timeout=10) as http:
                http.post(PREDICT, json={"inputs": [ROW]})

        sender = threading.Thread(target=first, daemon=True)
        sender.start()
        wait_until(lambda: client.xlen("q:breast-cancer:sync") == 1, 10, "the first request to be queued")
        s.procs["gateway-0"].kill()
        s.procs["gateway-0"].wait(10)
        s.signal("worker-0", signal.SIGCONT)
        (record,) = list(client.scan_iter("idem:acme:*"))
        wait_until(lambda: client.hget(record, "status") is not None, 10, "the worker to store the outcome")
        job_id = (client.hget(record, "job") or b"").decode()
        wait_until(lambda: not client.exists(f"job:{job_id}"), 10, "the job's own state to expire")
        with s.client(gateway=1, headers={**headers, "X-Bastion-Timeout-Ms": "3000"}) as http:
            retry = http.post(PREDICT, json={"inputs": [ROW]})
        assert retry.status_code == 200, retry.text
        assert retry.headers["idempotent-replayed"] == "true" and retry.json()["id"] == job_id
        client.close()
        sender.join(10)
    finally:
        s.stop()
