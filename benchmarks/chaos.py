"""The chaos suite with the issue's sizes; prints one table of figures (issue 5, Done-when 6).

Each scenario starts its own stack of real processes (see tests/chaos/scenarios.py): workers
SIGKILLed during a 10,000-job burst, redis-server SIGKILLed and restarted during submission, a
poison job among queued jobs (throughput with and without it, alternating runs), a primary
version whose artifact is corrupted on disk (breaker, fallback, repair, then every worker
frozen). The Idempotency-Key and long-job figures come from their tests, run here with -s.
For the poison runs the other jobs are queued through the gateway's enqueue script directly
(HTTP clients on this machine fill a queue ten times slower than the workers empty it).

Usage: .venv/bin/python benchmarks/chaos.py [--quick] [--only kills,redis,poison,breaker,idempotency,long]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos import scenarios  # noqa: E402


def _pytest_line(test: str, pattern: str) -> re.Match[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", test],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(pattern, done.stdout)
    if found is None or done.returncode != 0:
        raise SystemExit(f"{test} failed or printed no figure:\n{done.stdout[-2000:]}")
    return found


def rows_kills(quick: bool) -> list[tuple[str, str, str, bool]]:
    jobs = 2000 if quick else 10_000
    with tempfile.TemporaryDirectory() as root:
        f = scenarios.worker_kills(Path(root), jobs=jobs, workers=4, kills=20)
    what = f"{f['jobs']:,} async jobs, 4 workers, {f['kills']} SIGKILLs ({f['kills_holding_jobs']} holding jobs)"
    return [
        (what, f"lost {f['lost']}, succeeded {f['succeeded']:,}", "0 lost", f["lost"] == 0),
        (
            "  answers checked against in-process onnxruntime",
            f"wrong or missing {f['wrong_or_missing_answers']}; ran twice {f['ran_more_than_once']} "
            "(first outcome kept)",
            "0 clients see two results",
            f["wrong_or_missing_answers"] == 0,
        ),
        (
            "  submit-to-terminal per job",
            f"max {f['max_job_latency_s']} s, p99 {f['p99_job_latency_s']} s (run {f['all_terminal_s']} s)",
            f"<= 2 vis + job + 5 = {f['bound_s']} s",
            f["max_job_latency_s"] <= f["bound_s"],
        ),
    ]


def rows_redis(quick: bool) -> list[tuple[str, str, str, bool]]:
    with tempfile.TemporaryDirectory() as root:
        f = scenarios.redis_kill(Path(root), seconds=4.0 if quick else 9.0, down_s=1.5 if quick else 3.0)
    return [
        (
            f"redis-server SIGKILLed mid-burst, down {f['redis_down_s']} s, restarted",
            f"202: {f['accepted_202']:,}, completed {f['succeeded']:,}, lost {f['lost']}",
            "every 202 completes",
            f["lost"] == 0,
        ),
        (
            "  answers while Redis was down",
            f"503: {f['refused_503']:,} (p99 {f['p99_503_while_down_ms']} ms), 5xx other {f['answers_500']}, "
            f"no answer {f['no_answer']}, other {f['other_codes'] or 0}",
            "503, never 202 or 500",
            f["answers_500"] == 0 and f["no_answer"] == 0 and not f["other_codes"],
        ),
        (
            "  recovery",
            f"Redis up in {f['redis_restart_s']} s; "
            f"202s again after {'> 60' if f['accepting_again_after_s'] is None else f['accepting_again_after_s']} s; "
            f"all accepted done {f['all_accepted_done_after_s']} s after restart; "
            f"Bastion processes exited: {', '.join(f['bastion_exits']) or 'none'}",
            "202s again, no restart of Bastion",
            f["accepting_again_after_s"] is not None and not f["bastion_exits"],
        ),
    ]


def rows_idempotency(_: bool) -> list[tuple[str, str, str, bool]]:
    rows = []
    for kind, test in (
        ("predicts", "tests/test_idempotency.py::test_100_concurrent_predicts_with_one_key_run_one_job"),
        ("submissions", "tests/test_idempotency.py::test_100_concurrent_submissions_with_one_key_enqueue_one_job"),
    ):
        m = _pytest_line(test, r"one Idempotency-Key: ([0-9.]+) job run, (\d+) answers replayed")
        rows.append(
            (
                f"100 concurrent {kind}, one Idempotency-Key (2 gateways)",
                f"{m.group(1)} job run, {m.group(2)} replayed",
                "exactly 1 job",
                m.group(1) == "1",
            )
        )
    return rows


def rows_long(_: bool) -> list[tuple[str, str, str, bool]]:
    m = _pytest_line(
        "tests/chaos/test_long_jobs.py", r"slow job ran ([0-9.]+) s \(([0-9.]+)x .*runs counted: ([0-9.]+)"
    )
    return [
        (
            "job running past the visibility timeout (heartbeat)",
            f"ran {m.group(1)} s = {m.group(2)}x the timeout; runs {m.group(3)}",
            ">= 3x, runs exactly once",
            float(m.group(2)) >= 3 and m.group(3) == "1",
        )
    ]


MAX_DROP_PCT = 10  # others' throughput with a poison job among them; the null run must resolve it


def rows_poison(quick: bool) -> list[tuple[str, str, str, bool]]:
    jobs, rounds = (5000, 1) if quick else (60_000, 5)
    with tempfile.TemporaryDirectory() as root:
        null = scenarios.poison(Path(root), jobs=jobs, rounds=rounds, null=True)
    rows: list[tuple[str, str, str, bool]] = [
        (
            f"null run: {jobs:,} queued jobs, {rounds} rounds, no poison sent",
            f"{null['plain_jobs_per_s']:,}/s vs {null['second_jobs_per_s']:,}/s: 'drop' {null['drop_pct']} %",
            f"the method's noise, |'drop'| < {MAX_DROP_PCT} %",
            # a method whose noise alone reaches the threshold could not tell a poison's drop from none
            abs(null["drop_pct"]) < MAX_DROP_PCT,
        )
    ]
    for mode, what in (("time_limit", "runaway: stopped by the time limit"), ("crash", "kills its worker each run")):
        with tempfile.TemporaryDirectory() as root:
            f = scenarios.poison(Path(root), jobs=jobs, rounds=rounds, mode=mode)
        n = f["poison_jobs"]
        rows += [
            (
                f"poison job x {n} ({what})",
                f"{'/'.join(f['poison_status'])}; dead letters {f['dead_letter_entries']}; "
                f"time-limit stops {f['time_limit_stops']}, processes killed {f['worker_kills']} "
                f"(worker exits {f['worker_exits']})",
                "dead-lettered after max_deliveries (3)",
                f["poison_status"] == ["dead_lettered"] and f["dead_letter_entries"] == n,
            ),
            (
                f"  others' throughput, {f['jobs_per_run']:,} queued jobs, {f['rounds']} alternating rounds",
                f"{f['plain_jobs_per_s']:,}/s without, {f['poisoned_jobs_per_s']:,}/s with: "
                f"drop {f['throughput_drop_pct']} %",
                f"drop < {MAX_DROP_PCT} %",
                f["throughput_drop_pct"] < MAX_DROP_PCT,
            ),
        ]
    return rows


def rows_breaker(_: bool) -> list[tuple[str, str, str, bool]]:
    with tempfile.TemporaryDirectory() as root:
        f = scenarios.breaker(Path(root))
    return [
        (
            f"primary failing 100 % for {f['failing_s']} s ({f['failing_calls']} calls)",
            f"opened after {f['failed_before_open'] + 1} failures; "
            f"fallback answered {f['fallback_answers']} (labelled)",
            "breaker opens, fallback answers",
            f["fallback_answers"] > 0 and f["other_answers"] == 0,
        ),
        (
            "  calls reaching the primary while open",
            f"{f['primary_calls_after_open']} = half-open probes {f['half_open_probes']}",
            "probes only",
            f["primary_calls_after_open"] == f["half_open_probes"],
        ),
        (
            "  artifact repaired",
            f"closed after {f['closed_after_repair_s']} s; next call answered by v2: {f['answered_by_v2_after_close']}",
            "recovery closes it",
            bool(f["closed"] and f["answered_by_v2_after_close"]),
        ),
        (
            "  primary and fallback down (worker frozen, 250 ms deadlines)",
            f"{f['both_down_timeouts_504']} timeouts while the breakers learn, then 503 x {f['both_down_503']}: "
            f"p99 {f['p99_503_ms']} ms, max {f['max_503_ms']} ms",
            "503 < 100 ms",
            f["max_503_ms"] < 100,
        ),
    ]


SCENARIOS = {
    "kills": rows_kills,
    "redis": rows_redis,
    "idempotency": rows_idempotency,
    "long": rows_long,
    "poison": rows_poison,
    "breaker": rows_breaker,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about the CI test's)")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    args = parser.parse_args()
    table: list[tuple[str, str, str, bool]] = []
    started = time.monotonic()
    for name in args.only.split(","):
        t0 = time.monotonic()
        rows: Any = SCENARIOS[name.strip()](args.quick)
        table += rows
        print(f"[{name}: {time.monotonic() - t0:.0f} s]", file=sys.stderr)
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    print(f"{'scenario':<{widths[0]}}  {'measured':<{widths[1]}}  {'target':<{widths[2]}}  holds")
    for what, measured, target, holds in table:
        print(f"{what:<{widths[0]}}  {measured:<{widths[1]}}  {target:<{widths[2]}}  {'yes' if holds else 'NO'}")
    print(f"(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
