"""A job that runs for several visibility timeouts is kept by its worker (heartbeat) and runs once."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest

from bastion.embedded.redis_server import free_port
from tests.chaos.models import slow_model
from tests.support import Stack, running, wait_until

VISIBILITY_S = 0.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(
        tmp_path_factory.mktemp("long"),
        workers=2,
        visibility_timeout_s=VISIBILITY_S,
        worker_metrics_port=_two_free_ports(),
        request_timeout_s=60,
    ) as s:
        yield s


def _two_free_ports() -> int:
    """A port that is free with the next one too: worker i takes metrics port base + i."""
    import socket

    for _ in range(50):
        base = free_port()
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        return base
    raise AssertionError("no two consecutive free ports")


def _runs(stack: Stack) -> float:
    total = 0.0
    for i in range(2):
        text = httpx.get(f"http://127.0.0.1:{stack.settings.worker_metrics_port + i}/metrics").text
        total += sum(float(v) for v in re.findall(r'bastion_worker_jobs_total\{model="slow",[^}]*\} ([0-9.e+]+)', text))
    return total


def test_a_job_three_times_longer_than_the_visibility_timeout_runs_once(stack: Stack) -> None:
    # 80 products: over 3 visibility timeouts (1.5 s) even on a fast, idle core (about 30 ms a product)
    stack.admin.register("slow", slow_model(steps=80), rows_independent=False)
    with stack.client(timeout=60) as http:
        job = http.post("/v1/models/slow/jobs", json={"inputs": [[1.0] * 30]}).json()["id"]
        wait_until(lambda: http.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 60, "the slow job")
    client = stack.redis_client()
    state = {k.decode(): v.decode() for k, v in client.hgetall(f"job:{job}").items() if k != b"result"}
    client.close()
    took = (int(state["finished"]) - int(state["started"])) / 1000
    time.sleep(took + 1)  # a second run, had another worker reclaimed the job, would end by now
    runs = _runs(stack)
    logs = stack.log("worker-0") + stack.log("worker-1")
    print(f"slow job ran {took:.2f} s ({took / VISIBILITY_S:.1f}x the visibility timeout); runs counted: {runs:g}")
    assert took > 3 * VISIBILITY_S
    assert runs == 1, "the other worker never reclaimed and re-ran it"
    assert "job_reclaimed" not in logs
