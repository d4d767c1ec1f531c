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
    stack = Stack(tmp_path, workers=2, visibility_timeout_s=2.0, max_batch=16).start()
    client = stack.client()
    rc = stack.redis_client()
    stream = queue_key("breast-cancer", "batch")
    try:
        body = {"inputs": [[1.0] * 30]}

        def consumers() -> dict[bytes, int]:
            return {c["name"]: c["pending"] for c in rc.xinfo_consumers(stream, CONSUMER_GROUP)}

        wait_until(lambda: {b"worker-0", b"worker-1"} <= set(consumers()), 30, "both workers to read the stream")

        def submit(_: int) -> str:
            r = client.post("/v1/models/breast-cancer/jobs", json=body)
            assert r.status_code == 202, r.text
            return str(r.json()["id"])

        # Queue the whole burst while both workers are frozen, so that once they run, worker-0
        # is busy on claimed batches for a while; kill it while it holds unacknowledged jobs.
        for name in ("worker-0", "worker-1"):
            stack.signal(name, signal.SIGSTOP)
        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(submit, range(JOBS)))
        assert len(set(ids)) == JOBS
        for name in ("worker-0", "worker-1"):
            stack.signal(name, signal.SIGCONT)
        wait_until(lambda: consumers().get(b"worker-0", 0) > 0, 20, "worker-0 to hold claimed jobs", 0.0005)
        stack.signal("worker-0", signal.SIGKILL)
        held = consumers().get(b"worker-0", 0)
        stack.wait("worker-0")
        killed_at = time.monotonic()

        def all_terminal() -> bool:
            return all(_status(client, i) in {"succeeded", "failed", "dead_lettered", "expired"} for i in ids)

        wait_until(all_terminal, 60, "every job to reach a terminal state", interval_s=0.5)
        statuses = [_status(client, i) for i in ids]
        lost = sum(s not in {"succeeded", "failed", "dead_lettered", "expired"} for s in statuses)
        print(
            f"jobs={JOBS} held_by_killed_worker={held} lost={lost} succeeded={statuses.count('succeeded')} "
            f"all_terminal_within_s={time.monotonic() - killed_at:.1f}"
        )
        assert held > 0
        assert lost == 0
        assert statuses.count("succeeded") == JOBS
        assert rc.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    finally:
        client.close()
        rc.close()
        stack.stop()


def _status(client: httpx.Client, job_id: str) -> str:
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return str(r.json()["status"])
