"""Benchmark OIP inference over gRPC next to OIP over HTTP, on one ``bastion up``, in one run.

    .venv/bin/python benchmarks/bench_grpc.py [--duration 8] [--concurrency 1,64] [--profile-s 6] [--json PATH]

1. starts an embedded Redis and ``bastion up --grpc-port N --redis-url ...`` (sized to the
   machine unless ``--gateways`` / ``--workers`` say otherwise), reads the first API key;
2. checks that one HTTP ``POST /v2/models/breast-cancer/infer`` (JSON) and one gRPC ``ModelInfer``
   (raw_input_contents, as tritonclient sends it) of the demo sample give the same outputs;
3. warms both up, then at each concurrency runs ``loadgen.py`` against the HTTP route and
   ``grpc_loadgen.py`` against the gRPC method (each a subprocess pinned to one CPU; the order
   alternates between concurrencies), sampling the CPU each server process used (/proc);
4. with ``--profile-s`` > 0, starts one more gateway under ``cProfile`` on the same Redis, drives
   gRPC at the highest concurrency at it for that long, stops it and prints where its time went:
   the functions with the most own time, and the own time summed by package;
5. prints one table, the p50 of gRPC over HTTP's at concurrency 1, the req/s of both at the
   highest concurrency, and the server CPU per request by process role.

The figures of one run are comparable with each other only: the machine is shared and noisy.
Arguments this script does not know are passed to ``bastion up`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_predict import (
    DEFAULT,
    HOST,
    LOADGEN,
    BastionStack,
    BenchError,
    Target,
    _count_list,
    _int_list,
    _raise_interrupt,
    clean_env,
    cpu_seconds,
    cpu_shares,
    format_table,
    free_port,
    http_request,
    running,
    stop_process,
    wait_ready,
)
from grpc_loadgen import INFER, SAMPLE_ROW, infer_request
from tritonclient.grpc import service_pb2

from bastion.embedded.redis_server import EmbeddedRedis

HERE = Path(__file__).resolve().parent
GRPC_LOADGEN = HERE / "grpc_loadgen.py"
MODEL = "breast-cancer"
V2_INFER = f"/v2/models/{MODEL}/infer"
V2_BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": SAMPLE_ROW}]}).encode()
HTTP_NAME, GRPC_NAME = "HTTP /v2 infer", "gRPC ModelInfer"


def run(argv: list[str], limit_s: float, what: str) -> dict[str, Any]:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=limit_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{what} ran past {limit_s:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}): {done.stderr[-2000:].decode()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def http_load(target: Target, body_file: Path, concurrency: int, duration_s: float, warmup_s: float, cpu: int) -> Any:
    argv = [sys.executable, str(LOADGEN), "--port", str(target.port), "--path", V2_INFER]
    argv += ["--body-file", str(body_file), "-c", str(concurrency), "-d", str(duration_s), "-w", str(warmup_s)]
    argv += ["--cpu", str(cpu), "-H", "Content-Type: application/json"]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    return run(argv, warmup_s + duration_s + 40, "loadgen (HTTP)")


def grpc_load(port: int, key: str, concurrency: int, duration_s: float, warmup_s: float, cpu: int) -> Any:
    argv = [sys.executable, str(GRPC_LOADGEN), "--port", str(port), "--key", key, "-c", str(concurrency)]
    argv += ["-d", str(duration_s), "-w", str(warmup_s), "--cpu", str(cpu)]
    return run(argv, warmup_s + duration_s + 40, "grpc_loadgen")


def check_same_answer(target: Target, grpc_port: int, key: str) -> dict[str, Any]:
    """One request each way: the outputs must agree (the label exactly, probabilities to 1e-6)."""
    status, payload = http_request(
        target.port, "POST", V2_INFER, V2_BODY, {**target.headers, "Content-Type": "application/json"}
    )
    if status != 200:
        raise BenchError(f"HTTP {V2_INFER} answered {status}: {payload[:300]!r}")
    http_out = {o["name"]: o["data"] for o in json.loads(payload)["outputs"]}
    with grpc.insecure_channel(f"{HOST}:{grpc_port}") as channel:
        raw = channel.unary_unary(INFER)(infer_request(), metadata=(("authorization", f"Bearer {key}"),), timeout=10)
    answer = service_pb2.ModelInferResponse.FromString(raw)
    kinds = {"INT64": "<i8", "FP32": "<f4"}
    grpc_out = {
        o.name: np.frombuffer(answer.raw_output_contents[i], dtype=kinds[o.datatype]).tolist()
        for i, o in enumerate(answer.outputs)
    }
    if http_out["label"] != grpc_out["label"] or not np.allclose(
        http_out["probabilities"], grpc_out["probabilities"], atol=1e-6, rtol=0
    ):
        raise BenchError(f"HTTP and gRPC disagree: {http_out} vs {grpc_out}")
    return grpc_out


def h2load_run(
    url: str, body: Path, headers: dict[str, str], concurrency: int, args: Any, http1: bool
) -> dict[str, Any]:
    """One ``h2load`` run (nghttp2's C load generator, the same client for both protocols): its
    per-request log gives p50/p99 and the completed count over the measured window."""
    log_file = body.with_suffix(f".{concurrency}.{'h1' if http1 else 'h2'}.log")
    argv = ["h2load", "-D", f"{args.duration:g}", "--warm-up-time", f"{args.run_warmup_s:g}", "-c", str(concurrency)]
    argv += ["-m", "1", "-t", "1", "--log-file", str(log_file), "-d", str(body), *(["--h1"] if http1 else [])]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    pin = ["taskset", "-c", str(args.loadgen_cpu)] if shutil.which("taskset") else []
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    try:
        done = subprocess.run([*pin, *argv, url], capture_output=True, timeout=args.duration + 60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError("h2load ran past its limit") from exc
    lines = (
        [line.split("\t") for line in log_file.read_text().splitlines() if line.strip()] if log_file.exists() else []
    )
    if done.returncode != 0 or not lines:
        raise BenchError(f"h2load failed ({done.returncode}): {(done.stdout + done.stderr)[-1000:].decode()}")
    ok = sorted(int(d) / 1000 for _, status, d in lines if status == "200")
    if not ok:
        raise BenchError(f"h2load: none of {len(lines)} answers was a 200")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_s = (after.ru_utime - used.ru_utime) + (after.ru_stime - used.ru_stime)
    return {
        "concurrency": concurrency,
        "errors": 0,
        "non_200": len(lines) - len(ok),  # shown in the table's errors column
        "client_cpu_share": client_s / max(time.monotonic() - began, 1e-9),
        "completed": len(ok),
        "requests_per_s": len(ok) / args.duration,
        "p50_ms": ok[len(ok) // 2],
        "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))],
    }


def h2load_rows(target: Target, grpc_port: int, key: str, workdir: Path, args: Any) -> list[dict[str, Any]]:
    """HTTP /v2 infer (HTTP/1.1) and gRPC ModelInfer (HTTP/2) driven by the same C client, so
    neither side's figures carry a Python client's cost. gRPC answers come back as HTTP 200 with
    the status in a trailer h2load does not read: ``check_same_answer`` has shown, with the same
    request bytes and key, that they succeed."""
    grpc_body, http_body = workdir / "grpc.bin", workdir / "v2.json"
    message = infer_request()
    grpc_body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)  # gRPC length-prefixed frame
    auth = {"authorization": f"Bearer {key}"}
    runs = [
        (HTTP_NAME, f"http://{HOST}:{target.port}{V2_INFER}", http_body, {"content-type": "application/json"}, True),
        (
            GRPC_NAME,
            f"http://{HOST}:{grpc_port}{INFER}",
            grpc_body,
            {"content-type": "application/grpc", "te": "trailers"},
            False,
        ),
    ]
    rows = []
    for concurrency in args.concurrency:
        for name, url, body, headers, http1 in runs:
            before, started = cpu_seconds(target.pid), time.monotonic()
            result = h2load_run(url, body, {**headers, **auth}, concurrency, args, http1)
            rows.append(measured(result, f"{name} (h2load)", before, target.pid, started))
            time.sleep(0.5)
    return rows


def measured(result: dict[str, Any], name: str, before: Any, pid: int, started: float) -> dict[str, Any]:
    result["server_cpu"] = cpu_shares(before, cpu_seconds(pid), time.monotonic() - started)
    result["server"] = name
    print(
        f"[{name}] c={result['concurrency']}: {result['requests_per_s']:.0f} req/s, "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms",
        file=sys.stderr,
        flush=True,
    )
    return result


def cpu_per_request(row: dict[str, Any]) -> str:
    """Server CPU milliseconds per completed request, by process role."""
    if not row["completed"]:
        return "no requests"
    per = {role: share * row["duration_s"] * 1000 / row["completed"] for role, share in row["server_cpu"].items()}
    total = sum(per.values())
    return f"{total:.2f} ms (" + ", ".join(f"{role} {ms:.2f}" for role, ms in per.items() if ms >= 0.005) + ")"


# the profile ------------------------------------------------------------------------------
_AREAS = (
    ("grpc/_cython", "grpc core (cygrpc)"),
    ("grpc/aio", "grpc.aio"),
    ("grpc/", "grpc (python)"),
    ("bastion/gateway/grpc", "bastion gRPC front door"),
    ("bastion/gateway", "bastion pipeline"),
    ("bastion/", "bastion (other)"),
    ("redis/", "redis client"),
    ("google/protobuf", "protobuf"),
    ("numpy", "numpy"),
    ("asyncio", "asyncio"),
    ("uvloop", "uvloop"),
    ("structlog", "structlog"),
    ("prometheus_client", "prometheus"),
)


def _area(filename: str) -> str:
    for needle, area in _AREAS:
        if needle in filename:
            return area
    return "built-ins" if filename.startswith(("~", "<")) else "other"


# ``python -m bastion <args>``, profiled between SIGUSR1 and SIGUSR2 (then the profile is written),
# timed by its main thread's CPU (the event loop's): the wall clock would count a coroutine's awaits.
_PROFILED = """
import cProfile, runpy, signal, sys, time
out = sys.argv[1]
sys.argv = ["bastion", *sys.argv[2:]]
profiler = cProfile.Profile(time.thread_time)

def dump(*_):
    profiler.disable()
    profiler.dump_stats(out)

signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
signal.signal(signal.SIGUSR2, dump)
runpy.run_module("bastion", run_name="__main__", alter_sys=True)
"""


def profile_gateway(redis_url: str, key: str, concurrency: int, seconds: float, cpu: int) -> dict[str, Any]:
    """One more gateway on the same Redis, warmed with gRPC load, then profiled during ``seconds``
    more of it (its event loop's thread: gRPC's own threads are C, not seen by cProfile)."""
    out = Path(tempfile.mkdtemp(prefix="bastion-grpc-profile-")) / "gateway.prof"
    port, grpc_port = free_port(), free_port()
    env = clean_env() | {
        "BASTION_REDIS_URL": redis_url,
        "BASTION_GATEWAY_PORT": str(port),
        "BASTION_GRPC_PORT": str(grpc_port),
        "BASTION_GATEWAY_ID": "profiled",
        "BASTION_DRAIN_S": "0",
        "BASTION_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-c", _PROFILED, str(out), "gateway"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(port, process, "the profiled gateway")
        grpc_load(grpc_port, key, concurrency, 1.0, 0.0, cpu)  # warm: connections, caches
        process.send_signal(signal.SIGUSR1)
        result = grpc_load(grpc_port, key, concurrency, seconds, 0.0, cpu)
        process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_process(process, signal.SIGTERM, 30.0)
    if not out.exists():
        raise BenchError("the profiled gateway wrote no profile")
    time.sleep(0.2)  # written in one call; let it finish
    stats = pstats.Stats(str(out))
    entries = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in entries.values()) or 1.0
    by_area: dict[str, float] = {}
    for (filename, _, _), (_, _, tt, _, _) in entries.items():
        by_area[_area(filename)] = by_area.get(_area(filename), 0.0) + tt
    top = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:20]
    return {
        "requests_per_s_under_profile": result["requests_per_s"],
        "completed": result["completed"],
        "profile_file": str(out),
        "own_time_by_area": {a: round(t / total, 4) for a, t in sorted(by_area.items(), key=lambda x: -x[1])},
        "top_own_time": [
            {"function": f"{Path(f).name}:{line}({name})", "share": round(tt / total, 4), "calls": calls}
            for (f, line, name), (_, calls, tt, _, _) in top
        ],
    }


def format_profile(profile: dict[str, Any]) -> str:
    lines = [
        f"profile of one gateway under cProfile, gRPC ModelInfer ({profile['completed']} requests, "
        f"{profile['requests_per_s_under_profile']:.0f} req/s with the profiler's overhead):",
        "  own time by package: "
        + ", ".join(f"{area} {share:.0%}" for area, share in profile["own_time_by_area"].items() if share >= 0.01),
        "  functions with the most own time:",
    ]
    lines += [f"    {t['share']:6.1%}  {t['calls']:>8}  {t['function']}" for t in profile["top_own_time"]]
    return "\n".join(lines)


# main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description="OIP over gRPC next to OIP over HTTP; other --flags go to bastion up")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 64], help="list (default 1,64)")
    parser.add_argument("--gateways", type=_count_list, default=[None], help=f"bastion up --gateways ({DEFAULT})")
    parser.add_argument("--workers", type=_count_list, default=[None], help=f"bastion up --workers ({DEFAULT})")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured load per protocol first (default 2)")
    parser.add_argument("--run-warmup-s", type=float, default=1.0, help="unmeasured start of each run (default 1)")
    parser.add_argument("--loadgen-cpu", type=int, default=0, help="CPU the load generators are pinned to (default 0)")
    parser.add_argument("--profile-s", type=float, default=6.0, help="profiled gRPC run, seconds; 0: none (default 6)")
    parser.add_argument(
        "--h2load",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also drive both protocols with h2load, one C client for both, when it is installed (default on)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep bastion's data directory (logs)")
    args, extra = parser.parse_known_args(argv)
    if len(args.gateways) != 1 or len(args.workers) != 1:
        parser.error("one --gateways and one --workers value (bench_predict.py compares configurations)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bastion-bench-grpc-"))
    body_file = workdir / "v2.json"
    body_file.write_bytes(V2_BODY)
    redis = EmbeddedRedis(workdir / "redis")
    redis_url = redis.start()
    grpc_port = free_port()
    rows: list[dict[str, Any]] = []
    c_rows: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    try:
        up_args = ["--grpc-port", str(grpc_port), "--redis-url", redis_url, *extra]
        stack = BastionStack(args.gateways[0], args.workers[0], up_args, args.keep_data)
        with running(stack) as target:
            key = target.headers["Authorization"].removeprefix("Bearer ")
            answer = check_same_answer(target, grpc_port, key)
            print(f"[{target.name}] warming up ({args.warmup_s:g} s per protocol)", file=sys.stderr, flush=True)
            http_load(target, body_file, 16, args.warmup_s, 0.0, args.loadgen_cpu)
            grpc_load(grpc_port, key, 16, args.warmup_s, 0.0, args.loadgen_cpu)
            for i, concurrency in enumerate(args.concurrency):
                for protocol in (HTTP_NAME, GRPC_NAME) if i % 2 == 0 else (GRPC_NAME, HTTP_NAME):
                    before, started = cpu_seconds(target.pid), time.monotonic()
                    if protocol == HTTP_NAME:
                        result = http_load(
                            target, body_file, concurrency, args.duration, args.run_warmup_s, args.loadgen_cpu
                        )
                    else:
                        result = grpc_load(
                            grpc_port, key, concurrency, args.duration, args.run_warmup_s, args.loadgen_cpu
                        )
                    rows.append(measured(result, protocol, before, target.pid, started))
                    time.sleep(0.5)
            if args.h2load and shutil.which("h2load"):
                c_rows = h2load_rows(target, grpc_port, key, workdir, args)
            elif args.h2load:
                print("h2load is not installed (scripts/bench-deps.sh installs it): no C-client runs", file=sys.stderr)
            if args.profile_s > 0:
                top = max(args.concurrency)
                print(f"profiling one more gateway ({args.profile_s:g} s of gRPC at c={top})", file=sys.stderr)
                profile = profile_gateway(redis_url, key, top, args.profile_s, args.loadgen_cpu)
    finally:
        redis.stop()
    print()
    print(format_table(rows))
    print()
    at = {(r["server"], r["concurrency"]): r for r in rows}
    low, high = min(args.concurrency), max(args.concurrency)
    http_low, grpc_low = at[(HTTP_NAME, low)], at[(GRPC_NAME, low)]
    http_high, grpc_high = at[(HTTP_NAME, high)], at[(GRPC_NAME, high)]
    p50_ratio = grpc_low["p50_ms"] / http_low["p50_ms"] if http_low["p50_ms"] else float("nan")
    rps_ratio = grpc_high["requests_per_s"] / http_high["requests_per_s"] if http_high["requests_per_s"] else 0.0
    print(f"at concurrency {low}: p50 gRPC {grpc_low['p50_ms']:.2f} ms, HTTP {http_low['p50_ms']:.2f} ms")
    print(f"  gRPC p50 / HTTP p50: {p50_ratio:.2f} ({'no worse' if p50_ratio <= 1.0 else 'WORSE'})")
    print(
        f"at concurrency {high}: gRPC {grpc_high['requests_per_s']:.0f} req/s, HTTP {http_high['requests_per_s']:.0f}"
    )
    print(f"  gRPC req/s / HTTP req/s: {rps_ratio:.2f}")
    print(f"  server CPU per request, gRPC: {cpu_per_request(grpc_high)}")
    print(f"  server CPU per request, HTTP: {cpu_per_request(http_high)}")
    if c_rows:
        print()
        print("the same two with one C client (h2load, pinned like the load generators):")
        print(format_table(c_rows))
        c_at = {(r["server"], r["concurrency"]): r for r in c_rows}
        h_low, g_low = c_at[(f"{HTTP_NAME} (h2load)", low)], c_at[(f"{GRPC_NAME} (h2load)", low)]
        h_high, g_high = c_at[(f"{HTTP_NAME} (h2load)", high)], c_at[(f"{GRPC_NAME} (h2load)", high)]
        c_ratio = g_low["p50_ms"] / h_low["p50_ms"] if h_low["p50_ms"] else float("nan")
        verdict = "no worse" if c_ratio <= 1.0 else "WORSE"
        print(f"  h2load, concurrency {low}: gRPC p50 / HTTP p50: {c_ratio:.2f} ({verdict})")
        if h_high["requests_per_s"]:
            rps = g_high["requests_per_s"] / h_high["requests_per_s"]
            print(f"  h2load, concurrency {high}: gRPC req/s / HTTP req/s: {rps:.2f}")
    if profile is not None:
        print()
        print(format_profile(profile))
    load_after = os.getloadavg()
    print(
        f"(load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; {os.cpu_count()} CPUs; "
        f"load generators pinned to CPU {args.loadgen_cpu}; extra bastion up args: {extra or 'none'})"
    )
    if args.json:
        report = {
            "started": time.time(),
            "machine": {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
            "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "extra": extra},
            "answer": answer,
            "rows": rows,
            "h2load_rows": c_rows,
            "grpc_p50_over_http_at_lowest": p50_ratio,
            "grpc_rps_over_http_at_highest": rps_ratio,
            "profile": profile,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if not args.keep_data:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up as on Ctrl-C
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_grpc: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_grpc: interrupted", file=sys.stderr)
        sys.exit(130)
