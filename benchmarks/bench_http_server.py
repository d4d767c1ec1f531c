"""HTTP front doors compared: throughput at concurrency 64 and the CPU one huge request head costs.

    .venv/bin/python benchmarks/bench_http_server.py [--duration 4] [--rounds 2] [--app plain|bastion]

Each server runs in its own process (one worker, uvloop where it has a choice) on 127.0.0.1 and
serves one cheap route; ``--app plain`` (default) is a 20-line ASGI app answering 16 bytes, so the
table shows what the HTTP layer itself costs (the guard's share is largest there); ``--app bastion``
serves Bastion's own ``/healthz`` through its real middleware stack (``bastion.asgi.new_app``, no
Redis needed). The servers:

* ``uvicorn-httptools``: uvicorn's httptools protocol as it ships (no bound on the head);
* ``uvicorn-guard``: the same with ``bastion.httpserver`` (head bytes and count, head and body
  timers, connection caps; Bastion's default settings);
* ``uvicorn-h11``: uvicorn's h11 protocol, ``h11_max_incomplete_event_size`` = 32 KiB;
* ``granian`` and ``hypercorn`` (h11, ``h11_max_incomplete_size`` = 32 KiB) when importable.

For each: req/s and p99 of ``POST /healthz`` (what ``loadgen.py`` sends; the bastion app answers
it with its ``GET /healthz`` handler) from ``loadgen.py`` (closed loop, keep-alive) at
``--concurrency`` (64), then the server's CPU time (its whole process tree) for one request whose
head carries a 1 MB and a 10 MB header, and the status it answered (or ``closed``). The two uvicorn
httptools variants run ``--rounds`` times, alternating, and the printed ratio is the guard's median
req/s over the unguarded median, from this one run. Bounded: about 1-2 minutes; every server is
stopped on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import run_load_sync  # noqa: E402

HOST = "127.0.0.1"
HEAD_LIMIT = 32 << 10
BODY = b'{"status":"ok"}\n'


# the apps ------------------------------------------------------------------------------------
async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The plain app: 16 bytes for any request."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def bastion_app() -> Any:
    """Bastion's /healthz behind its real middleware (no lifespan work, so no Redis)."""
    from contextlib import asynccontextmanager

    from bastion import health
    from bastion.asgi import new_app

    @asynccontextmanager
    async def lifespan(_: Any) -> Any:
        yield

    async def ready(_: Any) -> tuple[bool, dict[str, Any]]:
        return True, {}

    built = new_app("bench", lifespan, docs_enabled=False, max_body_bytes=1 << 20)
    router = health.router(ready)
    built.include_router(router)
    healthz = next(r for r in router.routes if getattr(r, "path", "") == "/healthz")
    built.add_api_route("/healthz", healthz.endpoint, methods=["POST"])  # loadgen.py sends POST
    return built


def _target(which: str) -> Any:
    return bastion_app() if which == "bastion" else app


# serving (in the child process) ----------------------------------------------------------------
def serve(kind: str, port: int, which: str) -> None:
    _pin(1)
    if kind.startswith("uvicorn"):
        import uvicorn

        from bastion import httpserver
        from bastion.settings import Settings

        target = _target(which)
        common: dict[str, Any] = {"log_config": None, "access_log": False, "lifespan": "on"}
        if kind == "uvicorn-guard":
            config = httpserver.config(target, Settings(), host=HOST, port=port)
        elif kind == "uvicorn-h11":
            config = uvicorn.Config(
                target,
                host=HOST,
                port=port,
                loop="uvloop",
                http="h11",
                h11_max_incomplete_event_size=HEAD_LIMIT,
                **common,
            )
        else:
            config = uvicorn.Config(target, host=HOST, port=port, loop="uvloop", http="httptools", **common)
        uvicorn.Server(config).run()
    elif kind == "granian":
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.http import HTTP1Settings

        Granian(
            "bench_http_server:bastion_app" if which == "bastion" else "bench_http_server:app",
            address=HOST,
            port=port,
            interface=Interfaces.ASGI,
            workers=1,
            loop=Loops.uvloop,
            http=HTTPModes.http1,
            websockets=False,
            factory=which == "bastion",
            http1_settings=HTTP1Settings(header_read_timeout=10_000, max_buffer_size=HEAD_LIMIT),
            log_enabled=False,
        ).serve()
    elif kind == "hypercorn":
        import uvloop
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"{HOST}:{port}"]
        config.h11_max_incomplete_size = HEAD_LIMIT
        config.accesslog = None
        config.errorlog = None
        uvloop.run(hypercorn_serve(_target(which), config))
    else:
        raise SystemExit(f"unknown server {kind}")


# measuring (in the parent) ---------------------------------------------------------------------
def _pin(cpu: int) -> None:
    """The load generator on CPU 0, the server on CPU 1 (when there are two), so they never share."""
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[cpu]})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tree_cpu(root: psutil.Process) -> float:
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if sock.recv(16).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise SystemExit("the server did not answer in time")


def huge_header(port: int, size: int, timeout_s: float = 30) -> str:
    """Send one request with a ``size``-byte header; the status answered, or how it ended."""
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: "
    payload = head + b"a" * size + b"\r\n\r\n"
    with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass  # refused mid-way: read what it answered
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
    if received.startswith(b"HTTP/1."):
        return received.split(b" ", 2)[1].decode()
    return "closed"


def measure(kind: str, which: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port), "--app", which],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        root = psutil.Process(process.pid)
        samples: list[float] = []  # the server's CPU at the window's start and end
        timers = [threading.Timer(t, lambda: samples.append(tree_cpu(root))) for t in (1.0, 1.0 + args.duration)]
        for timer in timers:
            timer.start()
        load = run_load_sync(
            port, "/healthz", {}, b"", concurrency=args.concurrency, duration_s=args.duration, warmup_s=1.0
        )
        for timer in timers:
            timer.join()
        found: dict[str, Any] = {
            "server": kind,
            "rps": load.requests_per_s,
            "p99_ms": load.p99_ms,
            "errors": load.errors + load.non_200,
            "cpu_us_per_request": (samples[1] - samples[0]) * 1e6 / max(load.completed, 1),
        }
        for label, size in (("1mb", 1 << 20), ("10mb", 10 << 20)):
            time.sleep(0.2)
            before = tree_cpu(root)
            started = time.perf_counter()
            status = huge_header(port, size)
            elapsed = time.perf_counter() - started
            time.sleep(0.2)  # let a server still parsing finish, so its CPU is counted
            found[f"head_{label}_cpu_ms"] = (tree_cpu(root) - before) * 1000
            found[f"head_{label}_status"] = status
            found[f"head_{label}_wall_ms"] = elapsed * 1000
        return found
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# the guard alone, in process ------------------------------------------------------------------
class _Transport:
    """Just enough of an asyncio transport for a protocol fed in process (no socket)."""

    def __init__(self) -> None:
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (HOST, 40000), "sockname": (HOST, 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _protocol_cpu(guarded: bool, requests: int) -> float:
    """CPU seconds per keep-alive GET fed straight into one protocol instance (parse, app, reply)."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from bastion import httpserver
    from bastion.settings import Settings

    if guarded:
        config = httpserver.config(app, Settings(), host=HOST, port=0)
    else:
        config = uvicorn.Config(app, host=HOST, port=0, http="httptools", log_config=None, access_log=False)
    config.load()
    cls = config.http_protocol_class if guarded else HttpToolsProtocol
    state = ServerState()
    protocol = cls(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
    protocol.connection_made(_Transport())  # type: ignore[arg-type]
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    started = time.process_time()
    for _ in range(requests):
        protocol.data_received(request)
        while state.tasks:
            await asyncio.sleep(0)
    spent = time.process_time() - started
    protocol.connection_lost(None)
    return spent / requests


def protocol_cost(rounds: int, requests: int = 20_000) -> dict[str, float]:
    """Median CPU µs per request of each protocol, alternating A B B A ... in one process."""
    import uvloop

    found: dict[bool, list[float]] = {False: [], True: []}
    for i in range(rounds):
        for guarded in (False, True) if i % 2 == 0 else (True, False):
            found[guarded].append(uvloop.run(_protocol_cpu(guarded, requests)) * 1e6)
    return {"httptools_us": statistics.median(found[False]), "guard_us": statistics.median(found[True])}


def _median(results: list[dict[str, Any]], kind: str, field: str) -> float:
    return float(statistics.median(r[field] for r in results if r["server"] == kind))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per load run (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each uvicorn-httptools variant (default 2)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections (default 64)")
    parser.add_argument("--app", choices=["plain", "bastion"], default="plain", help="what the servers serve")
    parser.add_argument("--servers", default="", help="comma-separated subset of the servers (default: all)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.app)
        return 0
    _pin(0)
    others = ["uvicorn-h11"] + [k for k in ("granian", "hypercorn") if importlib.util.find_spec(k) is not None]
    wanted = set(args.servers.split(",")) if args.servers else None
    plan: list[str] = []
    for i in range(args.rounds):
        pair = ["uvicorn-httptools", "uvicorn-guard"]
        plan += pair if i % 2 == 0 else pair[::-1]
    plan += others
    plan = [k for k in plan if wanted is None or k in wanted]
    results = []
    print(f"app: {args.app}   concurrency: {args.concurrency}   {args.duration:g} s per run")
    print(
        f"{'server':<18} | {'req/s':>8} | {'p99 ms':>7} | {'err':>4} | {'cpu us/req':>10} | "
        "1 MB head: cpu ms, answer | 10 MB head"
    )
    for kind in plan:
        r = measure(kind, args.app, args)
        results.append(r)
        print(
            f"{kind:<18} | {r['rps']:>8.0f} | {r['p99_ms']:>7.2f} | {r['errors']:>4} | "
            f"{r['cpu_us_per_request']:>10.1f} | "
            f"{r['head_1mb_cpu_ms']:>7.0f}  {r['head_1mb_status']:>6}       | "
            f"{r['head_10mb_cpu_ms']:>7.0f}  {r['head_10mb_status']:>6}",
            flush=True,
        )
    summary: dict[str, Any] = {"app": args.app, "concurrency": args.concurrency, "runs": results}
    medians = {k: _median(results, k, "rps") for k in dict.fromkeys(r["server"] for r in results)}
    cpu = {k: _median(results, k, "cpu_us_per_request") for k in medians}
    summary["median_rps"], summary["median_cpu_us_per_request"] = medians, cpu
    base = medians.get("uvicorn-httptools")
    if base:
        summary["ratio_to_uvicorn_httptools"] = {k: v / base for k, v in medians.items()}
        summary["cpu_ratio_to_uvicorn_httptools"] = {k: v / cpu["uvicorn-httptools"] for k, v in cpu.items()}
        print("medians, and their ratio to uvicorn-httptools (no guard) in this run:")
        print(f"  {'server':<18} {'req/s':>8} {'ratio':>7} {'cpu us/req':>11} {'ratio':>7}")
        for k, v in medians.items():
            print(f"  {k:<18} {v:>8.0f} {v / base:6.3f}x {cpu[k]:>11.1f} {cpu[k] / cpu['uvicorn-httptools']:6.3f}x")
    if not args.servers:
        cost = protocol_cost(max(args.rounds, 1) * 3)
        summary["protocol_cpu_us_per_request"] = cost
        print(
            "in process, no sockets (CPU per keep-alive GET: parse, app, reply; median of "
            f"{max(args.rounds, 1) * 3} runs each): httptools {cost['httptools_us']:.2f} us, "
            f"guard {cost['guard_us']:.2f} us, {cost['guard_us'] / cost['httptools_us']:.3f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
