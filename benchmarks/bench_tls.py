"""Predict throughput with TLS on every hop against plaintext, in one run.

    .venv/bin/python benchmarks/bench_tls.py [--duration 10] [--concurrency 64] [--rounds 3] [--json PATH]
    .venv/bin/python benchmarks/bench_tls.py --sequential      # one stack at a time instead of side by side

Mode ``plain`` is ``bastion up --gateways 2 --workers 1`` as every benchmark here runs it (the
embedded Redis on a unix socket, plain HTTP); mode ``tls`` is the same with ``--tls``: HTTPS from
the load generator to the gateways (a handshake per keep-alive connection, then AES-GCM on every
request and response), the gateways and the worker talking to the embedded Redis over TLS on a
loopback port with client certificates. ``loadgen.py`` (pinned to ``--loadgen-cpu``) drives
``--concurrency`` keep-alive connections at ``POST /v1/models/breast-cancer/predict`` for
``--duration`` seconds after ``--warmup-s`` of unmeasured load.

By default the two stacks run side by side (``--paired``, as ``bench_tracing.py`` does): on a
shared, noisy machine runs one after the other see different loads, while stacks running at the
same time share one load, so the ratio of their req/s is the ratio of their costs; the start
order alternates by round and the median of the per-round ratios is printed. Per request CPU
microseconds by process (gateway, worker, redis) say where the cost of TLS goes. Arguments this
script does not know go to ``bastion up``.
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

import bench_predict as bp  # noqa: E402 - after the path set-up above

MODES = ("plain", "tls")


def _measure(target: bp.Target, body_file: Path, args: argparse.Namespace, seconds: float, concurrency: int) -> Any:
    before, started = bp.cpu_seconds(target.pid), time.monotonic()
    found = bp.run_loadgen(target, body_file, concurrency, seconds, 1.0, args.loadgen_cpu)
    found["server_cpu"] = bp.cpu_shares(before, bp.cpu_seconds(target.pid), time.monotonic() - started)
    rate = max(found["requests_per_s"], 1e-9)  # CPU per request: steadier than req/s on a shared machine
    found["cpu_us_per_request"] = {k: round(v * 1e6 / rate) for k, v in found["server_cpu"].items()}
    found["cpu_us_per_request"]["all"] = round(sum(found["server_cpu"].values()) * 1e6 / rate)
    return found


def _stack(mode: str, extra: list[str], args: argparse.Namespace) -> bp.BastionStack:
    return bp.BastionStack(2, 1, [*extra, *(["--tls"] if mode == "tls" else [])], args.keep_data)


def run_round(order: list[str], args: argparse.Namespace, extra: list[str], body_file: Path) -> list[dict[str, Any]]:
    """Each mode of ``order`` measured: side by side (default) or one after the other."""
    body = body_file.read_bytes().strip()
    results: dict[str, dict[str, Any]] = {}
    if args.sequential:
        for mode in order:
            stack = _stack(mode, extra, args)
            try:
                target = stack.start()
                bp.check_predict(target, body)
                bp.run_loadgen(target, body_file, 16, args.warmup_s, 0.0, args.loadgen_cpu)
                results[mode] = _measure(target, body_file, args, args.duration, args.concurrency)
            finally:
                stack.stop()
    else:
        stacks: dict[str, tuple[bp.BastionStack, bp.Target]] = {}
        try:
            for mode in order:
                stack = _stack(mode, extra, args)
                stacks[mode] = (stack, stack.start())
                bp.check_predict(stacks[mode][1], body)

            def load(mode: str, seconds: float, concurrency: int, measure: bool) -> None:
                target = stacks[mode][1]
                if measure:
                    results[mode] = _measure(target, body_file, args, seconds, concurrency)
                else:
                    bp.run_loadgen(target, body_file, concurrency, seconds, 0.0, args.loadgen_cpu)

            for seconds, concurrency, measure in ((args.warmup_s, 16, False), (args.duration, args.concurrency, True)):
                threads = [threading.Thread(target=load, args=(m, seconds, concurrency, measure)) for m in stacks]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        finally:
            for stack, _ in stacks.values():
                stack.stop()
    for mode, found in results.items():
        found["mode"] = mode
    return [results[mode] for mode in order]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the start order (default 3)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured load before each run (default 2)")
    parser.add_argument("--loadgen-cpu", type=int, default=0, help="CPU the load generator is pinned to (default 0)")
    parser.add_argument("--sequential", action="store_true", help="one stack at a time instead of side by side")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep bastion's data directories (logs)")
    args, extra = parser.parse_known_args()
    body_file = Path(tempfile.mkdtemp(prefix="bastion-bench-tls-")) / "body.json"
    body_file.write_bytes(bp.SAMPLE.read_bytes())
    runs: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
        for found in run_round(order, args, extra, body_file):
            found["round"] = i
            runs.append(found)
            print(
                f"round {i + 1} {found['mode']:<5} {found['requests_per_s']:>7.0f} req/s  p50 {found['p50_ms']:.1f} ms"
                f"  p99 {found['p99_ms']:.1f} ms  errors {found.get('errors', 0) + found.get('non_200', 0)}  "
                f"cpu {bp._cpu_text(found['server_cpu'])}  us/request {found['cpu_us_per_request']}",
                flush=True,
            )
    medians = {m: statistics.median(r["requests_per_s"] for r in runs if r["mode"] == m) for m in MODES}
    rate = {(r["round"], r["mode"]): r["requests_per_s"] for r in runs}
    per_round = [rate[(i, "tls")] / rate[(i, "plain")] for i in range(args.rounds) if rate[(i, "plain")] > 0]
    cost = {m: statistics.median(r["cpu_us_per_request"]["all"] for r in runs if r["mode"] == m) for m in MODES}
    print(f"median req/s: plain {medians['plain']:.0f}, tls {medians['tls']:.0f}")
    print(f"ratio tls / plain: {medians['tls'] / max(medians['plain'], 1e-9):.3f} (of the medians)")
    print(f"  per round: {', '.join(f'{x:.3f}' for x in per_round)}; median {statistics.median(per_round):.3f}")
    print(f"server CPU us/request (median): plain {cost['plain']}, tls {cost['tls']}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians, "per_round": per_round}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
