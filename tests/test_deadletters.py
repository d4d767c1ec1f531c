"""Dead letters through the admin API: listed without inputs, replayed once, and then they run."""

from __future__ import annotations

import time
from pathlib import Path

from bastion import demo
from bastion.queue.consumer import Consumer
from tests.support import Stack, wait_until

ROW = [1.0] * 30


def test_a_dead_lettered_job_is_listed_and_replayed(tmp_path: Path) -> None:
    stack = Stack(tmp_path, workers=0)
    try:
        stack.start()
        with stack.client() as http:
            job = http.post(f"/v1/models/{demo.MODEL_NAME}/jobs", json={"inputs": [ROW]}).json()["id"]
            client = stack.redis_client()
            # A consumer that takes the job and never finishes it: reclaimed at once, past its deliveries.
            ghost = Consumer(client, "ghost", result_ttl_s=3600, sync_result_ttl_s=60)
            ghost.ensure_groups([demo.MODEL_NAME])
            assert [j.job_id for j in ghost.read([demo.MODEL_NAME], 10, None)] == [job]
            time.sleep(0.01)
            run, dead = ghost.reclaim([demo.MODEL_NAME], min_idle_ms=0, max_deliveries=1)
            assert not run and [j.job_id for j in dead] == [job]
            ghost.dead_letter(dead, 1)
            assert http.get(f"/v1/jobs/{job}").json()["status"] == "dead_lettered"

            letters = stack.admin.dead_letters(demo.MODEL_NAME)
            assert [(d["job_id"], d["tenant"], d["kind"]) for d in letters] == [(job, "acme", "async")]
            assert "delivered 1 times" in letters[0]["reason"]
            assert all("x" not in d and "inputs" not in d for d in letters), "inputs are never listed"

            assert stack.admin.replay(demo.MODEL_NAME) == {
                "model": demo.MODEL_NAME,
                "replayed": 1,
                "discarded": 0,
                "not_replayable": 0,
                "not_found": 0,
            }
            assert stack.admin.dead_letters(demo.MODEL_NAME) == []
            assert stack.admin.replay(demo.MODEL_NAME, [letters[0]["id"]])["not_found"] == 1  # once only
            assert http.get(f"/v1/jobs/{job}").json()["status"] == "queued"
            stack.start_worker(0)
            wait_until(lambda: http.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 30, "the replayed job")
            client.close()
    finally:
        stack.stop()
