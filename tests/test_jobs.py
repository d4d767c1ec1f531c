"""Async jobs: 202 + id, state and result by id, server-sent events until the job ends."""

from __future__ import annotations

import signal

import httpx

from bastion.timefmt import parse_iso
from tests.support import Stack, wait_until

ROW = [1.0] * 30


def test_job_lifecycle_and_result(stack: Stack) -> None:
    with stack.client() as http:
        r = http.post("/v1/models/breast-cancer/jobs", json={"inputs": [ROW, ROW]})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued"

        def done() -> bool:
            return http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"

        wait_until(done, 10, "the job to succeed")
        final = http.get(f"/v1/jobs/{job['id']}").json()
        expected = http.post("/v1/models/breast-cancer/predict", json={"inputs": [ROW, ROW]}).json()["outputs"]
    assert final["outputs"] == expected
    assert final["version"] == job["version"]
    assert parse_iso(final["created_at"]) <= parse_iso(final["started_at"]) <= parse_iso(final["finished_at"])


def test_job_events_stream_until_the_result(stack: Stack) -> None:
    """The SSE stream ends with a ``result`` event carrying the outputs."""
    with stack.client() as http:
        job = http.post("/v1/models/breast-cancer/jobs", json={"inputs": [ROW]}).json()
        events: list[str] = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                if line.startswith("data: ") and events and events[-1] == "result":
                    assert '"outputs"' in line
    assert events[-1] == "result"


def test_jobs_need_the_jobs_scope(stack: Stack) -> None:
    key = stack.admin.create_key("acme", "predict only", ["predict"])["key"]
    wait_until(lambda: _status(stack, key) != 401, 5, "the new key to reach the gateway")
    assert _status(stack, key) == 403


def _status(stack: Stack, key: str) -> int:
    r = httpx.post(
        f"{stack.gateway}/v1/models/breast-cancer/jobs",
        json={"inputs": [ROW]},
        headers={"Authorization": f"Bearer {key}"},
    )
    return r.status_code


def test_a_sync_call_past_its_deadline_is_504_and_its_job_stays_expired(stack: Stack) -> None:
    """After a 504 the job's stored outcome is 'expired'; a late worker cannot store another answer."""
    stack.signal("worker-0", signal.SIGSTOP)
    try:
        with stack.client() as http:
            r = http.post(
                "/v1/models/breast-cancer/predict", json={"inputs": [ROW]}, headers={"X-Bastion-Timeout-Ms": "200"}
            )
            assert r.status_code == 504, r.text
            assert r.headers["content-type"] == "application/problem+json"
            job_id = r.json()["job_id"]
            assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "expired"
    finally:
        stack.signal("worker-0", signal.SIGCONT)
    with stack.client() as http:
        assert http.post("/v1/models/breast-cancer/predict", json={"inputs": [ROW]}).status_code == 200
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "expired"
