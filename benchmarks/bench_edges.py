"""Replay issue 11's findings against ``bastion up --gateways 2`` and say, for each, PASS or FAIL.

    .venv/bin/python benchmarks/bench_edges.py [--only 1,2,...] [--quick] [--json [PATH]]
    PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/bench_edges.py --src /tmp/base/src   # other code

It starts the real supervisor (2 gateways, 1 worker, a fresh data directory, free ports; the
gateway on ``--host 127.0.0.2``, a loopback alias standing in for a public address, so that an
admin API bound on ``--host`` shows), a victim tenant calling predict 80 times a second from
its own address (127.0.0.3, separate process, latency counted from each request's schedule),
and then, one finding after the other: a quiet baseline window (5 s), the attack (from its own
127.0.0.1x address) while every process is sampled from /proc, and the verdict. Scale (``--quick``
in brackets): 1. 4 connections x 20 [10] MB header, 20,000 [10,000] headers, an 8 [4] MB bearer
token; 2. 1,000 [300] connections dribbling a head at 1 byte/s and a predict body at 1 byte/s,
watched 22 [18] s; 3. an unauthenticated 64 [32] MB JSON body to the admin API; 4. four
connections of 1,024-row async jobs for 15 [8] s; 5. up to 1,000 [300] event streams on one job,
held 8 [5] s, then the key revoked; 6. a 48 [16] MB protobuf-bomb ONNX and an unrouted version
with 4 [2] MB of labels; 7. /metrics, id sequences, Host reflection, admin port on --host.
A full run takes about 5 minutes (``--quick`` about 3), all on 127.0.0.1.

Verdict rules are in ``edges/core.py`` (for unauthenticated attacks, victim p99 <= 2x baseline
with a 5 ms floor; for tenant attacks, no victim error and Redis under its maxmemory; every
process under 1 GB; the finding's own checks).
Bounds the checks compare against are passed to ``bastion up`` explicitly (``BOUND_FLAGS``), so
the same flags run on code that ignores them (where the check then fails).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from edges import front, tenant  # noqa: E402 - after the path set-up above
from edges.core import PREDICT, Context, Finding, Result, Scale, VictimLog, redis_ops, run, wait_key  # noqa: E402
from edges.stack import Sampler, Stack  # noqa: E402

GATEWAY_HOST = "127.0.0.2"
VICTIM_SOURCE = "127.0.0.3"
VICTIM_RATE = 80.0
BOUND_FLAGS = [
    "--max-stored-result-bytes",
    str(tenant.STORED_RESULT_BOUND),
    "--max-streams-per-key",
    str(tenant.STREAMS_PER_KEY),
    "--artifact-check-memory-mb",
    "2048",
    "--worker-models",
    "breast-cancer",  # the model edges-parked (finding 5) is served by no worker
]
FINDINGS: dict[int, Finding] = {f.number: f for f in [*front.FINDINGS, *tenant.FINDINGS]}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated finding numbers (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller attacks, shorter windows")
    parser.add_argument("--json", nargs="?", const="-", default=None, help="also write JSON (to PATH, or stdout)")
    parser.add_argument("--bastion", default=str(ROOT / ".venv" / "bin" / "bastion"), help="command prefix of bastion")
    parser.add_argument("--src", default=None, help="run the code under this src/ (python -m bastion, PYTHONPATH)")
    parser.add_argument("--keep-data", action="store_true", help="keep the data directory (its logs/)")
    return parser.parse_args()


def _command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONUNBUFFERED"] = "1"
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.src).resolve()), env.get("PYTHONPATH", "")]).rstrip(":")
        return [sys.executable, "-m", "bastion"], env
    return shlex.split(args.bastion), env


def _start_victim(stack: Stack, key: str, log: Path) -> subprocess.Popen[bytes]:
    sample = ROOT / "src" / "bastion" / "demo" / "sample.json"
    argv = [
        sys.executable,
        str(HERE / "edges" / "victim.py"),
        "--host",
        stack.host,
        "--port",
        str(stack.gateway_port),
        "--source",
        VICTIM_SOURCE,
        "--path",
        PREDICT,
        "--key",
        key,
        "--body-file",
        str(sample),
        "--rate",
        str(VICTIM_RATE),
        "--out",
        str(log),
    ]
    return subprocess.Popen(argv)


def _failed(finding: Finding, scale: Scale, exc: BaseException, seconds: float) -> dict[str, Any]:
    return {
        "number": finding.number,
        "title": finding.title,
        "kind": finding.kind,
        "scale": finding.scale(scale),
        "verdict": "ERROR",
        "error": f"{type(exc).__name__}: {exc}",
        "seconds": seconds,
    }


def _summary(result: Result) -> dict[str, Any]:
    w, before, after = result.window, result.redis_before, result.redis_after
    ops = (int(after["total_commands_processed"]) - int(before["total_commands_processed"])) / w.seconds
    gateways = sum(v for k, v in w.cpu_pct.items() if k.startswith("gateway"))
    return {
        "number": result.number,
        "title": result.title,
        "kind": result.kind,
        "scale": result.scale,
        "verdict": "PASS" if result.passed else "FAIL",
        "attacker": result.report.attacker,
        "checks": [asdict(c) for c in result.checks],
        "victim_baseline": asdict(result.baseline),
        "victim_during": asdict(result.during),
        "p99_ratio": result.ratio,
        "attack_s": w.seconds,
        "gateway_cpu_pct": gateways,
        "cpu_pct": w.cpu_pct,
        "peak_rss_mb": w.peak_rss_mb,
        "peak_child_rss_mb": w.peak_child_rss_mb,
        "redis_used_mb": int(after["used_memory"]) / 2**20,
        "redis_maxmemory_mb": int(after["maxmemory_config"]) / 2**20,
        "redis_cmds_s": ops,
        "figures": result.report.figures,
        "seconds": result.seconds,
        "settle_s": result.settle_s,
    }


def _print_result(row: dict[str, Any]) -> None:
    from rich.console import Console

    rprint = Console(soft_wrap=True, highlight=False).print

    colour = "green" if row["verdict"] == "PASS" else "red"
    rprint(
        f"\n[bold]{row['number']}. {row['title']}[/bold] ({row['kind']}; {row['scale']}): "
        f"[{colour}]{row['verdict']}[/{colour}]"
    )
    if "error" in row:
        rprint(f"  the replay failed: {row['error']}")
        return
    if row["settle_s"] > 1.5:
        rprint(f"  (waited {row['settle_s']:.0f} s for Redis to settle after the previous replay)")
    for line in row["attacker"]:
        rprint(f"  attacker: {line}")
    base, during = row["victim_baseline"], row["victim_during"]
    rprint(
        f"  victim: baseline p50 {base['p50_ms']:.1f} / p99 {base['p99_ms']:.1f} ms (n={base['count']}); during "
        f"p50 {during['p50_ms']:.1f} / p99 {during['p99_ms']:.1f} ms (n={during['count']}, "
        f"{during['errors']} errors, {during['non_200']} non-200)"
    )
    rss = ", ".join(f"{k} {v:.0f}" for k, v in sorted(row["peak_rss_mb"].items()))
    rprint(
        f"  resources over {row['attack_s']:.1f} s: gateways {row['gateway_cpu_pct']:.0f}% CPU; peak RSS MB {rss}; "
        f"Redis {row['redis_used_mb']:.1f} MB of maxmemory {row['redis_maxmemory_mb']:.0f} MB (0: unset), "
        f"{row['redis_cmds_s']:.0f} cmds/s"
    )
    for check in row["checks"]:
        mark = "[green]ok[/green]  " if check["ok"] else "[red]FAIL[/red]"
        rprint(f"  {mark} {check['what']}: {check['detail']}")


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="issue 11 edge benchmark", show_lines=True)
    for name in (
        "#",
        "finding",
        "scale",
        "victim p50/p99 ms base",
        "during",
        "p99 x",
        "gw CPU",
        "max RSS MB",
        "Redis MB (max)",
        "cmds/s",
        "verdict",
    ):
        table.add_column(name, overflow="fold")
    for row in rows:
        if "error" in row:
            table.add_row(str(row["number"]), row["title"], row["scale"], "-", "-", "-", "-", "-", "-", "-", "ERROR")
            continue
        base, during = row["victim_baseline"], row["victim_during"]
        worst = max(row["peak_rss_mb"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        maxmem = f"{row['redis_maxmemory_mb']:.0f}" if row["redis_maxmemory_mb"] else "unset"
        failed = sum(1 for c in row["checks"] if not c["ok"])
        verdict = "PASS" if not failed else f"FAIL ({failed} of {len(row['checks'])} checks)"
        table.add_row(
            str(row["number"]),
            row["title"],
            row["scale"],
            f"{base['p50_ms']:.1f} / {base['p99_ms']:.1f}",
            f"{during['p50_ms']:.1f} / {during['p99_ms']:.1f}",
            f"{row['p99_ratio']:.2f}",
            f"{row['gateway_cpu_pct']:.0f}%",
            f"{worst[0]} {worst[1]:.0f}",
            f"{row['redis_used_mb']:.0f} ({maxmem})",
            f"{row['redis_cmds_s']:.0f}",
            verdict,
        )
    Console(width=200).print(table)


def main() -> int:
    args = _parse()
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    from bastion.adminclient import AdminClient

    scale = Scale.quick() if args.quick else Scale()
    numbers = [int(n) for n in args.only.split(",") if n.strip()] or sorted(FINDINGS)
    command, env = _command(args)
    stack = Stack(command, env, GATEWAY_HOST, BOUND_FLAGS, args.keep_data)
    print(
        f"bastion: {shlex.join(command)} up --gateways 2 --workers 1 --host {GATEWAY_HOST} {shlex.join(BOUND_FLAGS)}"
        + (f"  (PYTHONPATH={env['PYTHONPATH']})" if args.src else "")
    )
    print(
        f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; victim {VICTIM_RATE:g} predicts/s from "
        f"{VICTIM_SOURCE}; findings {numbers}{' (quick)' if args.quick else ''}"
    )
    rows: list[dict[str, Any]] = []
    victim: subprocess.Popen[bytes] | None = None
    admin = None
    started = time.monotonic()
    try:
        stack.start()
        admin = AdminClient(stack.admin_url, stack.admin_key, timeout_s=60.0)
        victim_key = admin.create_key("victim", "victim", ["predict", "jobs"], "standard")["key"]
        wait_key(stack, victim_key)
        log = stack.data_dir / "victim.log"
        victim = _start_victim(stack, victim_key, log)
        time.sleep(3.0)  # warm-up
        ctx = Context(stack, admin, scale, VictimLog(log), victim_key, Sampler(stack))
        ctx.idle_ops = redis_ops(stack, 2.0)
        print(f"idle: Redis {ctx.idle_ops:.0f} cmds/s with the victim alone")
        for number in numbers:
            finding = FINDINGS[number]
            begun = time.monotonic()
            try:
                row = _summary(run(ctx, finding))
            except Exception as exc:  # one broken replay must not hide the others
                row = _failed(finding, scale, exc, time.monotonic() - begun)
            rows.append(row)
            _print_result(row)
    finally:
        if victim is not None:
            victim.send_signal(signal.SIGTERM)
            try:
                victim.wait(10)
            except subprocess.TimeoutExpired:
                victim.kill()
        if admin is not None:
            admin.close()
        code = stack.stop()
    print()
    _table(rows)
    print(f"total {time.monotonic() - started:.0f} s; bastion up exit code {code}; load {os.getloadavg()[0]:.2f}")
    if args.json:
        text = json.dumps({"findings": rows, "scale": asdict(scale), "bound_flags": BOUND_FLAGS}, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0 if rows and all(r["verdict"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
