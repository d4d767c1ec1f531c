"""Benchmark the decision log: what it costs the request path, and how fast the control plane logs.

    .venv/bin/python benchmarks/bench_audit.py [--rounds 3] [--duration 8] [--concurrency 64]
        [--events 50000] [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test] [--only predict,consumer]

1. predict: ``bastion up --gateways 2 --workers 1`` with the decision log on, and with
   ``--no-decision-log``, ``--rounds`` times each, alternating which goes first; ``loadgen.py`` at
   ``--concurrency`` for ``--duration`` s. During the runs with the log on it samples the audit
   lag (the age of the oldest event the control plane has not logged yet; 0 when none waits)
   every 50 ms. Prints each run, the medians, the ratio on / off and the lag's p50/p99/max.
2. consumer: ``--events`` decision events of the real shape are put on a real Redis stream, then
   the control plane's consumer (``bastion.audit``) appends them with its checkpoint loop running
   (every second), into SQLite and into PostgreSQL; prints events/s and the checkpoints signed.

Every figure comes from this one run: compare within it (the machine is shared and noisy), and
rerun before trusting a figure near a threshold (on/off >= 0.95, >= 5,000 events/s, lag p99 <= 1 s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_predict  # noqa: E402


def _redis_of(data_dir: Path) -> Any:
    """A client of ``bastion up``'s embedded Redis (its socket and password from its config)."""
    import redis

    conf = {}
    for line in (data_dir / "redis" / "redis.conf").read_text().splitlines():
        name, _, value = line.partition(" ")
        conf[name] = value.strip()
    return redis.Redis(unix_socket_path=conf["unixsocket"], password=conf.get("requirepass"))


class LagSampler:
    """Every 50 ms: how old the oldest event waiting on the audit stream is (0 when none)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import redis

        from bastion.constants import AUDIT_STREAM

        while not self.stop.wait(0.05):
            try:
                oldest = self.client.xrange(AUDIT_STREAM, count=1)
                now_ms = time.time() * 1000
            except (OSError, redis.RedisError) as exc:  # the stack is stopping
                print(f"lag sample missed: {type(exc).__name__}", file=sys.stderr)
                continue
            if oldest:
                born_ms = int(oldest[0][0].decode().split("-")[0])
                self.samples.append(max(0.0, (now_ms - born_ms) / 1000))
            else:
                self.samples.append(0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def predict_run(args: argparse.Namespace, logging: bool, body_file: Path) -> dict[str, Any]:
    extra = [] if logging else ["--no-decision-log"]
    stack = bench_predict.BastionStack(2, 1, extra, keep_dir=False)
    measure_args = argparse.Namespace(
        warmup_s=args.warmup_s,
        concurrency=[args.concurrency],
        duration=args.duration,
        run_warmup_s=1.0,
        loadgen_cpu=args.loadgen_cpu,
    )
    sampler = None
    with bench_predict.running(stack) as target:
        if logging:
            sampler = LagSampler(_redis_of(stack.data_dir))
            sampler.thread.start()
        (row,) = bench_predict.measure(target, measure_args, body_file)
        caught_up_s = None
        if sampler is not None:
            from bastion.constants import AUDIT_STREAM

            sampler.stop.set()
            sampler.thread.join()
            started = time.monotonic()
            while sampler.client.xlen(AUDIT_STREAM) and time.monotonic() - started < 30:
                time.sleep(0.05)
            caught_up_s = round(time.monotonic() - started, 2)
            sampler.client.close()
    row["decision_log"] = logging
    row["lag_samples"] = sampler.samples if sampler is not None else []
    row["caught_up_after_load_s"] = caught_up_s
    return row


def bench_predict_on_off(args: argparse.Namespace) -> dict[str, Any]:
    body = bench_predict.SAMPLE.read_bytes()
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        Path(body_file.name).write_bytes(body)
        runs: list[dict[str, Any]] = []
        for round_ in range(args.rounds):
            order = (True, False) if round_ % 2 == 0 else (False, True)
            for logging in order:
                row = predict_run(args, logging, Path(body_file.name))
                runs.append(row)
                print(
                    f"round {round_ + 1} log {'on ' if logging else 'off'}: {row['requests_per_s']:.0f} req/s, "
                    f"p99 {row['p99_ms']:.2f} ms, errors {row.get('errors', 0)}",
                    flush=True,
                )
    on = [r["requests_per_s"] for r in runs if r["decision_log"]]
    off = [r["requests_per_s"] for r in runs if not r["decision_log"]]
    lag = [s for r in runs for s in r["lag_samples"]]
    summary = {
        "on_median_req_s": statistics.median(on),
        "off_median_req_s": statistics.median(off),
        "ratio_on_off": statistics.median(on) / statistics.median(off),
        "lag_p50_s": _percentile(lag, 0.50),
        "lag_p99_s": _percentile(lag, 0.99),
        "lag_max_s": max(lag, default=float("nan")),
        "lag_samples": len(lag),
        "caught_up_after_load_s": [r["caught_up_after_load_s"] for r in runs if r["decision_log"]],
    }
    print(
        f"predict c={args.concurrency}: log on {summary['on_median_req_s']:.0f} req/s, off "
        f"{summary['off_median_req_s']:.0f} req/s: on/off {summary['ratio_on_off']:.3f}; audit lag p50 "
        f"{summary['lag_p50_s']:.3f} s, p99 {summary['lag_p99_s']:.3f} s, max {summary['lag_max_s']:.3f} s "
        f"({summary['lag_samples']} samples); logged everything within {summary['caught_up_after_load_s']} s "
        "after the load stopped",
        flush=True,
    )
    for r in runs:
        r.pop("lag_samples", None)
    return {"runs": runs, **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="on/off pairs (default 3)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--concurrency", type=int, default=64, help="load generator concurrency (default 64)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured load first (default 2)")
    parser.add_argument("--loadgen-cpu", type=int, default=0, help="CPU the load generator is pinned to (default 0)")
    parser.add_argument("--events", type=int, default=50_000, help="events for the consumer benchmark (default 50000)")
    parser.add_argument(
        "--pg-url",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for the consumer benchmark ('' to skip it)",
    )
    parser.add_argument("--only", default="predict,consumer", help="which parts (default predict,consumer)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",")}
    figures: dict[str, Any] = {}
    if "predict" in parts:
        figures["predict"] = bench_predict_on_off(args)
    if "consumer" in parts:
        import bench_audit_consumer

        figures["consumer"] = bench_audit_consumer.run(args.events, args.pg_url)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
