"""The delivery guarantees under real faults (issue 5's chaos suite; figures: benchmarks/chaos.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import scenarios


def _show(name: str, figures: dict[str, object]) -> None:
    print(name, " ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_workers_sigkilled_during_a_burst_lose_nothing_and_answer_once(tmp_path: Path) -> None:
    f = scenarios.worker_kills(tmp_path, jobs=10_000, workers=4, kills=20)
    _show("worker_kills", f)
    assert f["kills"] >= 20 and f["kills_holding_jobs"] > 0
    assert f["lost"] == 0
    assert f["succeeded"] == 10_000
    # Each client's answer is its own input's (checked against onnxruntime in-process); an outcome
    # is written once (complete.lua), so a job that ran twice still shows one result.
    assert f["wrong_or_missing_answers"] == 0, "a client saw an answer that is not its input's"
    assert f["max_job_latency_s"] <= f["bound_s"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_redis_sigkilled_and_restarted_keeps_every_accepted_job(tmp_path: Path) -> None:
    f = scenarios.redis_kill(tmp_path)
    _show("redis_kill", f)
    assert f["refused_503"] > 0, "the outage was not seen by any client"
    assert f["answers_500"] == 0 and f["no_answer"] == 0 and not f["other_codes"]
    assert f["lost"] == 0 and f["succeeded"] == f["accepted_202"]
    assert f["accepting_again_after_s"] is not None
    assert f["accepted_202"] > f["accepted_before_kill"], "submissions were accepted again after the restart"
    assert f["bastion_exits"] == [], "no Bastion process had to be restarted"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_runaway_poison_job_is_stopped_and_dead_lettered_while_other_jobs_flow(tmp_path: Path) -> None:
    f = scenarios.poison(tmp_path, jobs=5000, workers=4, mode="time_limit")
    _show("poison", f)
    assert f["poison_status"] == ["dead_lettered"]
    assert "dead-letter" in str(f["poison_error"])
    assert f["dead_letter_entries"] == 1
    assert f["time_limit_stops"] == 3, "stopped once per delivery (max_deliveries 3)"
    assert f["worker_exits"] == 0, "a stopped call does not cost a worker process"
    # Others' throughput with and without it is measured by benchmarks/chaos.py (printed here).


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_poison_job_that_kills_its_worker_each_time_is_dead_lettered(tmp_path: Path) -> None:
    f = scenarios.poison(tmp_path, jobs=2000, workers=4, mode="crash")
    _show("poison_crash", f)
    assert f["poison_status"] == ["dead_lettered"]
    assert f["dead_letter_entries"] == 1
    assert f["worker_kills"] == 3, "killed on each of its 3 deliveries, never again"
    # the killed loop was forked again by its worker's master: no worker process was restarted
    assert f["worker_exits"] == 0 and len({k.rsplit(":", 1)[1] for k in f["killer_log"]}) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_primary_opens_its_breaker_and_the_fallback_answers(tmp_path: Path) -> None:
    f = scenarios.breaker(tmp_path)
    _show("breaker", f)
    assert 1 <= f["failed_before_open"] <= 10
    assert f["fallback_answers"] > 0 and f["other_answers"] == 0
    # while open the primary gets only the probes let through in half-open
    assert f["primary_calls_after_open"] == f["half_open_probes"]
    assert f["closed"] and f["closed_after_repair_s"] < 10 and f["answered_by_v2_after_close"]
    assert f["both_down_503"] > 0 and f["both_down_other"] == 0
    assert f["max_503_ms"] < 100
