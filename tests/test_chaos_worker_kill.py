"""At-least-once delivery: SIGKILL a worker mid-burst and every accepted job still ends."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bastion.constants import CONSUMER_GROUP, queue_key
from tests.support import Stack, wait_until

JOBS = 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_a_worker_mid_burst_loses_no_job(tmp_path: Path) -> None:
    stack = Stack(tmp_path, workers=2, visibility_timeout_s=2.0, max_batch=8, max_wait_ms=0).start()
    try:
        client = stack.client()
        body = {"inputs": [[1.0] * 30]}

        def submit(_: int) -> str:
            r = client.post("/v1/models/breast-cancer/jobs", json=body)
            assert r.status_code == 202, r.text
            return str(r.json()["id"])

        # Hold the burst until both workers are reading, then stop worker-0 from reading...
        stack.signal("worker-0", signal.SIGSTOP)
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(submit, range(JOBS)))
        assert len(set(ids)) == JOBS
        # ...resume it and kill it while it holds claimed, unacknowledged jobs.
        rc = stack.redis_client()
        stream = queue_key("breast-cancer", "batch")
        stack.signal("worker-0", signal.SIGCONT)

        def worker0_holds_jobs() -> bool:
            for consumer in rc.xinfo_consumers(stream, CONSUMER_GROUP):
                if consumer["name"] == b"worker-0" and consumer["pending"] > 0:
                    return True
            return False

        wait_until(worker0_holds_jobs, 20, "worker-0 to claim jobs", interval_s=0.001)
        stack.signal("worker-0", signal.SIGKILL)
        stack.wait("worker-0")
        killed_at = time.monotonic()

        def all_terminal() -> bool:
            return all(_status(client, i) in {"succeeded", "failed", "dead_lettered", "expired"} for i in ids)

        wait_until(all_terminal, 60, "every job to reach a terminal state", interval_s=0.5)
        statuses = [_status(client, i) for i in ids]
        lost = sum(s not in {"succeeded", "failed", "dead_lettered", "expired"} for s in statuses)
        print(
            f"jobs={JOBS} lost={lost} succeeded={statuses.count('succeeded')} "
            f"recovered_within_s={time.monotonic() - killed_at:.1f}"
        )
        assert lost == 0
        assert statuses.count("succeeded") == JOBS
        assert rc.xpending(stream, CONSUMER_GROUP)["pending"] == 0
        client.close()
    finally:
        stack.stop()


def _status(client: httpx.Client, job_id: str) -> str:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return str(r.json()["status"])
