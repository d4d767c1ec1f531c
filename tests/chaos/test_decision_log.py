"""Issue 14, done-when 1: every decision in the log exactly once, through real faults.

10,000 decisions - sync predictions, async jobs, fallback answers and response-cache hits -
through 2 gateways and 2 workers, while a worker is SIGKILLed 5 times (each time holding jobs
when it can) and the control plane (the log's only writer) once. Afterwards the log's decision
ids are exactly the ids the clients were answered with: none missing, none twice, none extra;
and the whole log verifies against its signed checkpoints.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bastion import demo
from bastion.constants import AUDIT_STREAM, CONSUMER_GROUP, queue_key
from tests.chaos.scenarios import JOBS, PREDICT, TERMINAL, distinct_rows, job_states
from tests.support import Stack, http_ok, running, wait_until

SYNC, ASYNC, FALLBACK, CACHED = 4_000, 3_000, 1_000, 1_000  # cached rows are asked twice: 2,000 decisions
KILLS = 5


def _sync(stack: Stack, rows: np.ndarray, threads: int = 16) -> list[str]:
    """Ask each row once, spread over both gateways; the ids of the answered ones."""
    clients = [stack.client(gateway=g, headers={"X-Bastion-Timeout-Ms": "30000"}) for g in (0, 1)]

    def one(i: int) -> str | None:
        r = clients[i % 2].post(PREDICT, json={"inputs": [rows[i].tolist()]})
        return str(r.json()["id"]) if r.status_code == 200 else None

    try:
        with ThreadPoolExecutor(threads) as pool:
            return [i for i in pool.map(one, range(len(rows))) if i is not None]
    finally:
        for c in clients:
            c.close()


def _async(stack: Stack, rows: np.ndarray, threads: int = 16) -> list[str]:
    clients = [stack.client(gateway=g) for g in (0, 1)]

    def one(i: int) -> str:
        r = clients[i % 2].post(JOBS, json={"inputs": [rows[i].tolist()]})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, range(len(rows))))
    finally:
        for c in clients:
            c.close()


def _restart_control(stack: Stack) -> None:
    stack.procs["control"].kill()
    stack.procs["control"].wait(10)
    stack._spawn("control", ["control"], {})
    wait_until(lambda: http_ok(f"{stack.control_url}/readyz"), 60, "the control plane again")


def _logged(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return [(str(i), str(k)) for i, k in conn.execute("SELECT event_id, kind FROM audit_leaves")]


def _admin(stack: Stack, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{stack.control_url}/admin/v1{path}",
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        timeout=120,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_log_holds_each_decision_exactly_once_through_worker_and_control_plane_kills(tmp_path: Path) -> None:
    rows = distinct_rows(SYNC + ASYNC + FALLBACK + CACHED)
    sync_rows, async_rows = rows[:SYNC], rows[SYNC : SYNC + ASYNC]
    fallback_rows, cached_rows = rows[SYNC + ASYNC : SYNC + ASYNC + FALLBACK], rows[SYNC + ASYNC + FALLBACK :]
    with running(
        tmp_path, workers=2, gateways=2, visibility_timeout_s=2.0, max_batch=32, max_deliveries=KILLS + 1
    ) as stack:
        stack.admin.register(demo.MODEL_NAME, demo.model_bytes())  # version 2: the fallback is version 1
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 2}], fallback=1)
        rc = stack.redis_client()
        killed: list[str] = []
        rng = random.Random(14)
        done = threading.Event()

        def killer() -> None:
            """A worker SIGKILLed every 1.5 s, preferring one that holds jobs, 5 times."""
            while len(killed) < KILLS and not done.is_set():
                time.sleep(1.5)
                alive = [f"worker-{i}" for i in range(2) if stack.procs[f"worker-{i}"].poll() is None]
                if not alive:
                    continue
                pending: dict[str, int] = {}
                for lane in ("sync", "batch"):
                    for c in rc.xinfo_consumers(queue_key(demo.MODEL_NAME, lane), CONSUMER_GROUP):
                        name = c["name"].decode()
                        pending[name] = pending.get(name, 0) + int(c["pending"])
                holders = [n for n in alive if pending.get(n, 0) > 0]
                name = rng.choice(holders or alive)
                stack.procs[name].kill()
                killed.append(name)

        answered: list[str] = []
        with stack.keep_workers():
            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            answered += _sync(stack, sync_rows)
            _restart_control(stack)  # the log's writer dies mid-run; the stream keeps the events
            jobs = _async(stack, async_rows)
            stack.admin.set_enabled(demo.MODEL_NAME, False)  # version 2 off: version 1 answers as the fallback
            time.sleep(0.5)
            fallback = _sync(stack, fallback_rows)
            stack.admin.set_enabled(demo.MODEL_NAME, True)
            stack.admin.set_serving(demo.MODEL_NAME, {"cache_ttl_s": 600})
            time.sleep(0.5)
            misses = _sync(stack, cached_rows)
            hits = _sync(stack, cached_rows)
            thread.join(60)
            done.set()
            deadline = time.monotonic() + 180
            while True:
                states = job_states(stack, jobs, ("status",))
                if all(s["status"] in TERMINAL for s in states) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        succeeded = [j for j, s in zip(jobs, states, strict=True) if s["status"] == "succeeded"]
        answered += succeeded + fallback + misses + hits
        wait_until(lambda: rc.xlen(AUDIT_STREAM) == 0, 120, "the control plane to log every event")
        logged = _logged(tmp_path / "bastion.db")
        decisions = [i for i, kind in logged if kind == "decision"]
        verified = _admin(stack, "POST", "/audit/verify", json={})
        hit_events = _admin(stack, "GET", f"/audit/events/{hits[0]}").json() if hits else {}
        fallback_event = _admin(stack, "GET", f"/audit/events/{fallback[0]}").json() if fallback else {}
        rc.close()

    print(
        f"decisions answered={len(answered)} (sync {len(sync_rows)}, async {len(succeeded)}, fallback {len(fallback)}, "
        f"cache misses {len(misses)}, hits {len(hits)}) logged={len(decisions)} distinct={len(set(decisions))} "
        f"kills={len(killed)}"
    )
    assert len(killed) == KILLS
    assert len(answered) == len(set(answered)) == SYNC + ASYNC + FALLBACK + 2 * CACHED, "every request was answered"
    assert len(decisions) == len(set(decisions)), "an event was logged twice"
    assert set(decisions) == set(answered), (
        f"missing {len(set(answered) - set(decisions))}, extra {len(set(decisions) - set(answered))}"
    )
    assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
    assert hit_events["event"]["cache"] is True
    assert fallback_event["event"]["role"] == "fallback"
