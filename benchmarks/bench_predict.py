"""Benchmark Bastion's sync predict endpoint against two naive FastAPI baselines, in one run.

    .venv/bin/python benchmarks/bench_predict.py [--duration 8] [--gateways default] [--workers default] [--json PATH]

1. starts ``bastion up`` in a temporary data directory on free ports, reads the first API key
   from its stdout and waits for the gateway's ``/readyz`` (``--gateways 1,2`` measures each
   configuration in turn, in the same run; ``default`` passes no flag, so ``bastion up`` sizes
   itself to the machine; ``--gateways 1,default`` prints the default's throughput over one gateway's);
2. warms it up, then runs ``loadgen.py`` (a subprocess pinned to one CPU) at each concurrency
   against ``POST /v1/models/breast-cancer/predict`` with the demo sample body;
3. stops it (SIGINT, as Ctrl-C would) and measures ``baseline_server.py --mode def`` and
   ``--mode async`` the same way, one after the other;
4. prints one table (with the CPU each server process used, sampled from /proc) and the
   ratios at the highest concurrency (64 by default).

Every figure comes from this one run: the machine is shared and noisy, so compare the rows of
one table, not figures from different runs. Arguments this script does not know are passed to
``bastion up`` unchanged (e.g. ``--max-wait-ms 1``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOADGEN = HERE / "loadgen.py"
BASELINE = HERE / "baseline_server.py"
SAMPLE = ROOT / "src" / "bastion" / "demo" / "sample.json"
MODEL = "breast-cancer"
PREDICT_PATH = f"/v1/models/{MODEL}/predict"
KEY_RE = re.compile(r"bst_[A-Za-z0-9_-]+")
HOST = "127.0.0.1"
# Chosen on the 2-core development machine: see README.md ("Choosing the defaults").
DEFAULT = "default"  # no --gateways / --workers flag: bastion up's own sizing to the machine


class BenchError(Exception):
    """A server would not start, answer or stop as expected."""


@dataclass
class Target:
    """One server under test: where it listens and which headers a request needs."""

    name: str
    port: int
    pid: int  # the server's root process: its CPU time and its descendants' are sampled
    headers: dict[str, str] = field(default_factory=dict)
    cacert: Path | None = None  # HTTPS (bastion up --tls): the CA that verifies it


# helpers --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without ``BASTION_*`` variables, so only our flags count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
    cacert: Path | None = None,
) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if cacert is None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    else:
        context = ssl.create_default_context(cafile=str(cacert))
        conn = http.client.HTTPSConnection(HOST, port, timeout=timeout_s, context=context)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(
    port: int, process: subprocess.Popen[bytes], what: str, timeout_s: float = 90.0, cacert: Path | None = None
) -> None:
    """Poll ``GET /readyz`` until it answers 200; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with code {process.returncode} before it was ready")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_request(port, "GET", "/readyz", timeout_s=1.0, cacert=cacert)[0] == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{what} was not ready within {timeout_s:.0f} s")


def check_predict(target: Target, body: bytes) -> Any:
    """One request; the prediction it returns (so the servers can be compared)."""
    headers = {**target.headers, "Content-Type": "application/json"}
    status, payload = http_request(target.port, "POST", PREDICT_PATH, body, headers, cacert=target.cacert)
    if status != 200:
        raise BenchError(f"{target.name}: predict answered {status}: {payload[:300]!r}")
    return json.loads(payload)["outputs"]


def run_loadgen(
    target: Target, body_file: Path, concurrency: int, duration_s: float, warmup_s: float, cpu: int
) -> dict[str, Any]:
    """Run loadgen.py as a subprocess pinned to ``cpu``; its JSON result."""
    argv = [
        sys.executable,
        str(LOADGEN),
        "--port",
        str(target.port),
        "--path",
        PREDICT_PATH,
        "--body-file",
        str(body_file),
        "-c",
        str(concurrency),
        "-d",
        str(duration_s),
        "-w",
        str(warmup_s),
        "--cpu",
        str(cpu),
        "-H",
        "Content-Type: application/json",
    ]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    if target.cacert is not None:
        argv += ["--cacert", str(target.cacert)]
    limit = warmup_s + duration_s + 40
    try:
        done = subprocess.run(argv, capture_output=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"loadgen against {target.name} ran past {limit:.0f} s") from exc
    if done.returncode != 0:
        raise BenchError(f"loadgen against {target.name} failed ({done.returncode}): {done.stderr[-2000:].decode()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), so none is left behind if ``pid`` hangs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


_ROLES = (("redis-server", "redis"), ("bastion gateway", "gw"), ("bastion worker", "wk"), ("bastion control", "ctl"))


def _role(pid: int) -> str:
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        for needle, role in _ROLES:
            if needle in cmdline:
                return role
    return "main"


def cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """CPU time (user + system) of ``root`` and its descendants: pid -> (role, seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (_role(pid), (int(fields[11]) + int(fields[12])) / tick)
    return out


def cpu_shares(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall_s: float
) -> dict[str, float]:
    """Per role, the share of one core used between two ``cpu_seconds`` samples (1.0 = a whole core)."""
    shares: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        used = seconds - before.get(pid, (role, 0.0))[1]
        shares[role] = shares.get(role, 0.0) + used / wall_s
    return {role: round(share, 3) for role, share in sorted(shares.items())}


def stop_process(process: subprocess.Popen[bytes], signum: int, timeout_s: float) -> int | None:
    """Send ``signum``, wait; kill the process and its descendants if it does not exit in time."""
    if process.poll() is not None:
        return process.returncode
    family = descendants(process.pid)
    process.send_signal(signum)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *family]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        return None


# the servers ----------------------------------------------------------------------------------
class BastionStack:
    """``bastion up`` in a temporary data directory; the API key from its first-run banner."""

    def __init__(self, gateways: int | None, workers: int | None, extra: list[str], keep_dir: bool) -> None:
        self.gateways = gateways
        self.workers = workers
        self.extra = extra
        self.keep_dir = keep_dir
        self.data_dir = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
        self.port = free_port()
        self.control_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self.exit_code: int | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bastion",
            "up",
            "--data-dir",
            str(self.data_dir),
            "--gateway-port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            *([] if self.gateways is None else ["--gateways", str(self.gateways)]),
            *([] if self.workers is None else ["--workers", str(self.workers)]),
            *self.extra,
        ]

    def start(self, timeout_s: float = 120.0) -> Target:
        stderr = open(self.data_dir / "up.stderr", "wb")  # handed to the child, closed below
        self.process = subprocess.Popen(
            self.argv(), stdout=subprocess.PIPE, stderr=stderr, env=clean_env(), start_new_session=True
        )
        stderr.close()
        threading.Thread(target=self._pump, daemon=True).start()
        key = self._read_key(timeout_s)
        cacert = self.data_dir / "tls" / "ca.pem" if "--tls" in self.extra else None
        wait_ready(self.port, self.process, "bastion up", cacert=cacert)
        return Target(self.name, self.port, self.process.pid, {"Authorization": f"Bearer {key}"}, cacert)

    @property
    def name(self) -> str:
        from bastion.settings import default_gateways, default_workers

        gateways = f"{DEFAULT}={default_gateways()}" if self.gateways is None else self.gateways
        workers = f"{DEFAULT}={default_workers()}" if self.workers is None else self.workers
        return f"bastion {gateways}g/{workers}w"

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines.put(raw.decode(errors="replace"))
        self.lines.put(None)

    def _read_key(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            match = KEY_RE.search(line)
            if match:
                return match.group(0)
        err = (self.data_dir / "up.stderr").read_text(errors="replace")[-2000:]
        raise BenchError(f"bastion up printed no API key (stdout: {''.join(self.output)[-500:]!r}; stderr: {err})")

    def stop(self) -> None:
        if self.process is not None:
            self.exit_code = stop_process(self.process, signal.SIGINT, 60.0)
            if self.exit_code != 0:
                print(f"warning: bastion up exited with {self.exit_code}; logs in {self.data_dir}", file=sys.stderr)
                self.keep_dir = True
        if not self.keep_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class Baseline:
    """``baseline_server.py --mode MODE`` on a free port."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Target:
        argv = [sys.executable, str(BASELINE), "--mode", self.mode, "--port", str(self.port)]
        self.process = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.DEVNULL, start_new_session=True)
        wait_ready(self.port, self.process, f"baseline {self.mode}")
        return Target(f"baseline-{self.mode}", self.port, self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, 15.0)


@contextlib.contextmanager
def running(server: BastionStack | Baseline) -> Iterator[Target]:
    try:
        yield server.start()
    finally:
        server.stop()


# the benchmark --------------------------------------------------------------------------------
def measure(target: Target, args: argparse.Namespace, body_file: Path) -> list[dict[str, Any]]:
    """Warm ``target`` up, then one loadgen run per concurrency."""
    print(f"[{target.name}] warming up ({args.warmup_s:g} s at concurrency 16)", file=sys.stderr, flush=True)
    run_loadgen(target, body_file, 16, args.warmup_s, 0.0, args.loadgen_cpu)
    rows = []
    for concurrency in args.concurrency:
        before, started = cpu_seconds(target.pid), time.monotonic()
        result = run_loadgen(target, body_file, concurrency, args.duration, args.run_warmup_s, args.loadgen_cpu)
        result["server_cpu"] = cpu_shares(before, cpu_seconds(target.pid), time.monotonic() - started)
        result["server"] = target.name
        rows.append(result)
        print(
            f"[{target.name}] c={concurrency}: {result['requests_per_s']:.0f} req/s, p99 {result['p99_ms']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(0.5)  # let queues drain between runs
    return rows


def bench_server(
    server: BastionStack | Baseline, args: argparse.Namespace, body: bytes, body_file: Path, answers: dict[str, Any]
) -> list[dict[str, Any]]:
    with running(server) as target:
        answers[target.name] = check_predict(target, body)
        return measure(target, args, body_file)


def _cpu_text(shares: dict[str, float]) -> str:
    return " ".join(f"{role} {share:.0%}" for role, share in shares.items() if share >= 0.005)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'server':<17} | {'conc':>4} | {'req/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6} | "
        f"{'client':>6} | server cpu (share of one core)"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        errors = r["errors"] + r["non_200"]
        lines.append(
            f"{r['server']:<17} | {r['concurrency']:>4} | {r['requests_per_s']:>7.0f} | {r['p50_ms']:>7.2f} | "
            f"{r['p99_ms']:>7.2f} | {errors:>6} | {r['client_cpu_share']:>6.0%} | {_cpu_text(r['server_cpu'])}"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]], concurrency: int) -> dict[str, dict[str, Any]]:
    """For each Bastion configuration at ``concurrency``: its p99, its req/s over each baseline's and,
    when a one-gateway configuration ran, over that one's."""
    at = {r["server"]: r for r in rows if r["concurrency"] == concurrency}
    out: dict[str, dict[str, Any]] = {}
    for name, mine in at.items():
        if not name.startswith("bastion"):
            continue
        entry = {"bastion_p99_ms": mine["p99_ms"], "bastion_rps": mine["requests_per_s"]}
        for mode in ("def", "async"):
            base = at.get(f"baseline-{mode}")
            if base and base["requests_per_s"] > 0:
                entry[f"bastion_over_{mode}_rps"] = mine["requests_per_s"] / base["requests_per_s"]
        out[name] = entry
    one = next((r for name, r in at.items() if name.startswith("bastion 1g/")), None)
    if one and one["requests_per_s"] > 0:
        for name, entry in out.items():
            if at[name] is not one:
                entry["bastion_over_1g_rps"] = at[name]["requests_per_s"] / one["requests_per_s"]
                entry["over_1g_of"] = one["server"]
    return out


def format_ratios(summary: dict[str, dict[str, Any]], concurrency: int) -> str:
    lines = [f"at concurrency {concurrency}:"]
    for name, entry in summary.items():
        lines.append(f"  {name}:")
        for mode in ("def", "async"):
            if f"bastion_over_{mode}_rps" in entry:
                lines.append(f"    Bastion / {mode}-baseline req/s: {entry[f'bastion_over_{mode}_rps']:.2f}x")
        if "bastion_over_1g_rps" in entry:
            lines.append(f"    req/s over {entry['over_1g_of']}: {entry['bastion_over_1g_rps']:.2f}x")
        lines.append(f"    Bastion p99: {entry['bastion_p99_ms']:.2f} ms")
    return "\n".join(lines)


def _count_list(text: str) -> list[int | None]:
    """``1,2,default``: process counts; ``default`` (None) lets bastion up size itself."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected counts or {DEFAULT!r}, got {text!r}")
    return [None if part == DEFAULT else _int_list(part)[0] for part in parts]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Bastion vs naive FastAPI baselines; unknown --flags are passed to 'bastion up'.",
    )
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run (default 8)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="list (default 1,16,64)")
    parser.add_argument(
        "--gateways",
        type=_count_list,
        default=[None],
        help=f"bastion up --gateways; a list runs each; {DEFAULT}: no flag, bastion up sizes itself (default)",
    )
    parser.add_argument(
        "--workers",
        type=_count_list,
        default=[None],
        help=f"bastion up --workers; a list runs each; {DEFAULT}: no flag, bastion up sizes itself (default)",
    )
    parser.add_argument("--servers", default="bastion,def,async", help="which to run (default bastion,def,async)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured load per server first (default 2)")
    parser.add_argument("--run-warmup-s", type=float, default=1.0, help="unmeasured start of each run (default 1)")
    parser.add_argument("--loadgen-cpu", type=int, default=0, help="CPU the load generator is pinned to (default 0)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep bastion's data directories (logs)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") and not a.startswith("--")]
    if bad:
        parser.error(f"unknown short options {bad}; only --flags are passed to bastion up")
    unknown = set(args.servers.split(",")) - {"bastion", "def", "async"}
    if unknown:
        parser.error(f"unknown servers {sorted(unknown)}; choose from bastion, def, async")
    return args, extra


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up as on Ctrl-C
    body = SAMPLE.read_bytes().strip()
    wanted = args.servers.split(",")
    started = time.time()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    answers: dict[str, Any] = {}
    exit_codes: dict[str, int | None] = {}
    if "bastion" in wanted:
        for gateways in args.gateways:
            for workers in args.workers:
                stack = BastionStack(gateways, workers, extra, args.keep_data)
                rows += bench_server(stack, args, body, SAMPLE, answers)
                exit_codes[stack.name] = stack.exit_code
    for mode in ("def", "async"):
        if mode in wanted:
            rows += bench_server(Baseline(mode), args, body, SAMPLE, answers)
    load_after = os.getloadavg()
    top = max(args.concurrency)
    summary = ratios(rows, top)
    print()
    print(format_table(rows))
    print()
    print(format_ratios(summary, top))
    labels = {name: a.get("label") for name, a in answers.items()}
    if len({json.dumps(v) for v in labels.values()}) > 1:
        print(f"warning: the servers disagree on the sample's label: {labels}")
    print(
        f"(load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; {os.cpu_count()} CPUs; "
        f"loadgen pinned to CPU {args.loadgen_cpu}; extra bastion up args: {extra or 'none'})"
    )
    if args.json:
        report = {
            "started": started,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "config": {
                **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "bastion_extra_args": extra,
            },
            "bastion_exit_codes": exit_codes,
            "answers": answers,
            "rows": rows,
            "at_top_concurrency": {"concurrency": top, **summary},
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_predict: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_predict: interrupted", file=sys.stderr)
        sys.exit(130)
