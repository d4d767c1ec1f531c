"""The circuit breaker: its state machine (pure), and what the gateway feeds it, over real
processes (the failure end-to-end test is tests/chaos/test_faults.py)."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from bastion import demo
from bastion.gateway.breakers import Breaker, Outcome, Policy, State
from tests.support import Stack, running, wait_until

POLICY = Policy(window=10, min_calls=5, failure_rate=0.5, slow_rate=0.8, slow_s=1.0, open_s=2.0, probes=2)


def _calls(b: Breaker, outcome: Outcome, n: int, now: float = 0.0, elapsed: float = 0.0) -> None:
    for _ in range(n):
        permit = b.allow(now)
        assert permit is not None
        b.record(permit, POLICY.judge(outcome, elapsed), now)


def test_failures_open_it_only_past_the_minimum_and_the_rate() -> None:
    b = Breaker("m", 1, POLICY)
    _calls(b, Outcome.FAILED, 4)
    assert b.state is State.CLOSED, "fewer than min_calls never open it"
    _calls(b, Outcome.FAILED, 1)
    assert b.state is State.OPEN
    assert b.allow(1.0) is None and b.retry_after(1.0) == 1

    healthy = Breaker("m", 2, POLICY)
    _calls(healthy, Outcome.OK, 6)
    _calls(healthy, Outcome.FAILED, 4)
    assert healthy.state is State.CLOSED, "4 failures in 10 calls is under 50%"
    _calls(healthy, Outcome.FAILED, 1)
    assert healthy.state is State.OPEN


def test_slow_calls_open_it_and_short_client_deadlines_are_not_counted() -> None:
    b = Breaker("m", 1, POLICY)
    _calls(b, Outcome.TIMEOUT, 50, elapsed=0.05)  # callers with 50 ms deadlines: not the version's fault
    assert b.state is State.CLOSED and not b.window
    _calls(b, Outcome.OK, 5, elapsed=1.5)
    assert b.state is State.OPEN, "answers slower than slow_s count as slow"


def test_half_open_lets_one_probe_at_a_time_and_closes_after_enough_successes() -> None:
    b = Breaker("m", 1, POLICY)
    _calls(b, Outcome.FAILED, 5)
    assert b.allow(1.9) is None
    probe = b.allow(2.0)
    assert probe is not None and probe.probe and b.state is State.HALF_OPEN
    assert b.allow(2.0) is None, "one probe in flight at a time"
    b.record(probe, Outcome.OK, 2.1)
    assert b.state is State.HALF_OPEN
    second = b.allow(2.1)
    assert second is not None
    b.record(second, Outcome.OK, 2.2)
    assert b.state is State.CLOSED and b.allow(2.2) is not None


def test_a_failed_probe_opens_it_again_and_an_ignored_one_frees_the_slot() -> None:
    b = Breaker("m", 1, POLICY)
    _calls(b, Outcome.FAILED, 5)
    probe = b.allow(2.0)
    assert probe is not None
    b.record(probe, Outcome.IGNORED, 2.0)  # refused before it ran (bad input): no verdict
    assert b.state is State.HALF_OPEN
    probe = b.allow(2.0)
    assert probe is not None
    b.record(probe, Outcome.FAILED, 2.5)
    assert b.state is State.OPEN and b.allow(4.0) is None and b.allow(4.5) is not None


def test_calls_let_through_before_it_opened_do_not_count_afterwards() -> None:
    b = Breaker("m", 1, POLICY)
    late = b.allow(0.0)
    assert late is not None
    _calls(b, Outcome.FAILED, 5)
    b.record(late, Outcome.OK, 0.1)
    assert b.state is State.OPEN and not b.window


def test_where_calls_go_when_a_version_is_failing() -> None:
    from bastion.routing import alternatives, choose
    from bastion.signature import Signature
    from bastion.snapshot import ModelRoutes, Route, Rule, VersionInfo

    v = {n: VersionInfo("m", n, "0" * 64, Signature((), ())) for n in (1, 2, 3)}
    live = ModelRoutes((Route(v[1], 90, "primary"), Route(v[2], 10, "canary")), fallback=v[3], disabled=False)

    def allowed(routes: ModelRoutes, jurisdiction: str | None = None) -> frozenset[int] | None:
        return choose("m", routes, "subject", "acme", jurisdiction).allowed

    assert [x.version for x in alternatives(live, 2, allowed(live))] == [3, 1], "a failing canary: fallback, primary"
    assert [x.version for x in alternatives(live, 1, allowed(live))] == [3]
    killed = ModelRoutes(live.routes, fallback=v[3], disabled=True)
    assert alternatives(killed, 3, None) == [], "the kill switch holds even when the fallback fails"
    eu_only = ModelRoutes(live.routes, fallback=v[3], disabled=False, rules=(Rule("EU", None, frozenset({1, 2})),))
    assert [x.version for x in alternatives(eu_only, 2, allowed(eu_only, "EU"))] == [1], "policy still applies"


PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"
JOBS = f"/v1/models/{demo.MODEL_NAME}/jobs"
ROW = [1.0] * 30
FAST = {"breaker_slow_s": 0.5, "breaker_min_calls": 5, "breaker_window": 10, "breaker_open_s": 0.5, "breaker_probes": 3}


def _state(stack: Stack) -> float:
    text = stack.gateway_metrics()
    found = re.findall(rf'bastion_breaker_state\{{model="{demo.MODEL_NAME}",version="1"\}} ([0-9.]+)', text)
    return float(found[0]) if found else 0.0


def test_clients_that_upload_slowly_are_timed_as_clients_and_never_open_the_breaker(tmp_path: Path) -> None:
    """The breaker's clock starts when the job is queued (after the body is read and parsed), so
    12 clients each taking over a second to send their body - twice the slow line - leave it closed."""
    with running(tmp_path, workers=1, **FAST) as stack:
        body = orjson.dumps({"inputs": [ROW]})
        pieces = [body[i : i + 40] for i in range(0, len(body), 40)]

        def dribble() -> Iterator[bytes]:
            for piece in pieces:
                time.sleep(1.1 / len(pieces))
                yield piece

        answers: list[int] = []

        def slow_client() -> None:
            with stack.client(headers={"Content-Type": "application/json"}) as http:
                answers.append(http.post(PREDICT, content=dribble()).status_code)

        threads = [threading.Thread(target=slow_client) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert answers == [200] * 12
        assert _state(stack) == 0, "slow uploads opened the breaker"
        with stack.client() as http:
            victim = http.post(PREDICT, json={"inputs": [ROW]})
        assert victim.status_code == 200 and "x-bastion-fallback" not in victim.headers


def test_async_jobs_alone_close_a_half_open_breaker(tmp_path: Path) -> None:
    """A half-open breaker's probe may be an async job: its outcome is watched, so a model that
    only gets async traffic recovers without a sync call."""
    with running(tmp_path, workers=1, **FAST) as stack:
        stack.signal("worker-0", signal.SIGSTOP)  # a stuck model: sync calls pass their deadline
        with stack.client(headers={"X-Bastion-Timeout-Ms": "600"}) as http:
            for _ in range(5):
                assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 504
            assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 503, "the breaker opened"
        assert _state(stack) == 2
        stack.signal("worker-0", signal.SIGCONT)
        time.sleep(0.6)  # past open_s: the next call is a probe

        def recovered() -> bool:
            with stack.client() as http:
                r = http.post(JOBS, json={"inputs": [ROW]})
                if r.status_code == 202:
                    wait_until(
                        lambda: http.get(f"/v1/jobs/{r.json()['id']}").json()["status"] == "succeeded", 10, "a probe"
                    )
            return _state(stack) == 0

        wait_until(recovered, 20, "async probes to close the breaker", interval_s=0.1)
        with stack.client() as http:
            assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
