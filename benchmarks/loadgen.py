"""A small, fast HTTP/1.1 keep-alive load generator (closed loop, pure asyncio, loopback only).

``C`` connections each send one fixed request, wait for the whole response, and send the next
one at once (a closed loop: the offered load is whatever the server can take at that
concurrency). The hot path is callback-driven (an ``asyncio.Protocol`` per connection, no
coroutine switch per request) and runs on uvloop when it is installed, so one core drives tens
of thousands of requests per second, well above what the servers measured here reach.

Responses are parsed properly: status line, headers, then a ``Content-Length`` body (or a
chunked one); a response is complete only when its last body byte has arrived.

Requests that *complete* inside the measurement window (after the warm-up) are counted;
``requests_per_s`` is that count divided by the window. Latency is measured from writing the
request to reading the last byte of its response. Every run is bounded: after the window, no
new request is sent, and requests still outstanding after ``drain_s`` are abandoned.

Use it as a library (``run_load``) or from the command line, which prints one JSON object::

    python benchmarks/loadgen.py --port 8000 --path /v1/models/breast-cancer/predict \\
        --header 'Authorization: Bearer bst_...' --body-file src/bastion/demo/sample.json -c 16 -d 8
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import math
import os
import ssl
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

HOST = "127.0.0.1"  # loopback only, on purpose
_MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    """The server sent something this client cannot parse as an HTTP/1.1 response."""


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    warmup_s: float
    completed: int  # responses (any status) completed inside the window
    requests_per_s: float  # completed / window
    ok_per_s: float  # 200 responses / window
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    non_200: int
    errors: int  # connection failures, resets, timeouts, unparsable responses (whole run)
    statuses: dict[str, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    client_cpu_s: float = 0.0  # CPU time this process used during the window
    client_cpu_share: float = 0.0  # client_cpu_s / window: near 1.0 means the client was the bottleneck
    uvloop: bool = False


def build_request(path: str, headers: dict[str, str], body: bytes, method: str = "POST") -> bytes:
    """The raw bytes of one keep-alive request (sent unchanged on every iteration)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
    names = {k.lower() for k in headers}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if "connection" not in names:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _ResponseParser:
    """Incremental HTTP/1.1 response parser; ``feed`` returns the statuses of completed responses."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status = 0
        self.body_left = -1  # -1: reading the head; >= 0: bytes of a Content-Length body still due
        self.chunked = False
        self.close_after = False

    def feed(self, data: bytes) -> list[tuple[int, bool]]:
        """Consume ``data``; return (status, server-closes-connection) for each response completed."""
        self.buf += data
        done: list[tuple[int, bool]] = []
        while True:
            if self.body_left < 0 and not self.chunked:
                if not self._read_head():
                    return done
            if self.chunked:
                if not self._read_chunks():
                    return done
            else:
                if len(self.buf) < self.body_left:
                    return done
                del self.buf[: self.body_left]
            done.append((self.status, self.close_after))
            self.body_left, self.chunked = -1, False

    def _read_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                raise ProtocolError("response head too large")
            return False
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        parts = head[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {head[0][:80]!r}")
        self.status = int(parts[1])
        length = -1
        self.close_after = parts[0] == "HTTP/1.0"
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self.chunked = True
            elif name == "connection":
                self.close_after = value.strip().lower() == "close"
        if self.chunked:
            return True
        if length < 0:
            if self.status in (204, 304) or 100 <= self.status < 200:
                length = 0
            else:
                raise ProtocolError("response without Content-Length or chunked encoding")
        self.body_left = length
        return True

    def _read_chunks(self) -> bool:
        """Consume whole chunks; True once the last chunk and trailers have arrived."""
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(self.buf[:end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = self.buf.find(b"\r\n\r\n", end)
                if trailer_end < 0:
                    return False
                del self.buf[: trailer_end + 4]
                return True
            if len(self.buf) < end + 2 + size + 2:
                return False
            del self.buf[: end + 2 + size + 2]


class _Run:
    """Shared state of one load run: the clock, the window, the results."""

    def __init__(self, request: bytes, concurrency: int, warmup_s: float, duration_s: float, timeout_s: float) -> None:
        self.request = request
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        now = time.perf_counter()
        self.window_start = now + warmup_s
        self.window_end = self.window_start + duration_s
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.outstanding = 0
        self.idle = asyncio.Event()

    def sending(self) -> bool:
        return time.perf_counter() < self.window_end

    def record(self, started: float, finished: float, status: int) -> None:
        if self.window_start <= finished < self.window_end:
            self.latencies.append(finished - started)
            self.statuses[status] += 1

    def error(self, kind: str) -> None:
        self.errors[kind] += 1


class _Connection(asyncio.Protocol):
    """One keep-alive connection in a closed loop: send, await the full response, send again."""

    def __init__(self, run: _Run, lost: asyncio.Future[None]) -> None:
        self.run = run
        self.lost = lost
        self.parser = _ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.in_flight = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.run.sending():
            self.transport.close()
            return
        self.in_flight = True
        self.run.outstanding += 1
        self.started = time.perf_counter()
        self.transport.write(self.run.request)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.run.timeout_s, self._check_timeout)

    def _check_timeout(self) -> None:
        self.timer = None
        if self.in_flight and time.perf_counter() - self.started >= self.run.timeout_s:
            self._fail("timeout")
        elif self.transport is not None and not self.transport.is_closing():
            self.timer = asyncio.get_running_loop().call_later(self.run.timeout_s / 4, self._check_timeout)

    def _done(self) -> None:
        self.in_flight = False
        self.run.outstanding -= 1
        if self.run.outstanding == 0 and not self.run.sending():
            self.run.idle.set()

    def _fail(self, kind: str) -> None:
        if self.in_flight:
            self.run.error(kind)
            self._done()
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            responses = self.parser.feed(data)
        except (ProtocolError, ValueError):
            self._fail("bad_response")
            return
        for status, close in responses:
            if not self.in_flight:
                self._fail("unsolicited_response")
                return
            self.run.record(self.started, time.perf_counter(), status)
            self._done()
            if close:
                assert self.transport is not None
                self.transport.close()
                return
            self._send()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.in_flight:
            self.run.error("connection_lost")
            self._done()
        if not self.lost.done():
            self.lost.set_result(None)


async def _connection_loop(run: _Run, port: int, tls: ssl.SSLContext | None = None) -> None:
    """Keep one connection busy until the window ends, reconnecting after failures (over TLS
    with ``tls``: one handshake per connection, as a keep-alive client)."""
    loop = asyncio.get_running_loop()
    while run.sending():
        lost: asyncio.Future[None] = loop.create_future()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    functools.partial(_Connection, run, lost),
                    HOST,
                    port,
                    ssl=tls,
                    server_hostname=HOST if tls is not None else None,
                ),
                timeout=run.timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            run.error(f"connect_{type(exc).__name__}")
            await asyncio.sleep(0.05)
            continue
        await lost


def summarize(
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    latencies_s: list[float],
    ok: int,
    statuses: dict[str, int],
    errors: dict[str, int],
    cpu_s: float,
) -> LoadResult:
    """One run's result from its measured latencies (seconds), successes, statuses and errors."""
    ms = sorted(v * 1000 for v in latencies_s)
    completed = len(ms)
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        completed=completed,
        requests_per_s=completed / duration_s,
        ok_per_s=ok / duration_s,
        p50_ms=_percentile(ms, 50),
        p90_ms=_percentile(ms, 90),
        p99_ms=_percentile(ms, 99),
        max_ms=ms[-1] if ms else 0.0,
        mean_ms=sum(ms) / completed if completed else 0.0,
        non_200=completed - ok,
        errors=sum(errors.values()),
        statuses=dict(sorted(statuses.items())),
        error_kinds=errors,
        client_cpu_s=cpu_s,
        client_cpu_share=cpu_s / duration_s,
        uvloop=_uvloop_installed(),
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(math.ceil(q / 100 * len(sorted_values)), 1)
    return sorted_values[rank - 1]


async def run_load(
    port: int,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 10.0,
    drain_s: float = 5.0,
    cacert: Path | None = None,
) -> LoadResult:
    """Drive ``concurrency`` keep-alive connections at 127.0.0.1:``port`` and measure the window
    (HTTPS verified against ``cacert`` when given)."""
    tls = ssl.create_default_context(cafile=str(cacert)) if cacert is not None else None
    if concurrency < 1 or duration_s <= 0:
        raise ValueError("concurrency must be >= 1 and duration_s > 0")
    run = _Run(build_request(path, headers, body), concurrency, warmup_s, duration_s, timeout_s)
    tasks = [asyncio.create_task(_connection_loop(run, port, tls)) for _ in range(concurrency)]
    await asyncio.sleep(max(run.window_start - time.perf_counter(), 0))
    cpu_at_start = time.process_time()
    await asyncio.sleep(max(run.window_end - time.perf_counter(), 0))
    cpu_s = time.process_time() - cpu_at_start
    # The window is over: connections stop sending; give outstanding requests ``drain_s``.
    if run.outstanding:
        try:
            await asyncio.wait_for(run.idle.wait(), drain_s)
        except TimeoutError:
            run.error("abandoned_at_end")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return _summarise(run, warmup_s, duration_s, cpu_s)


def _summarise(run: _Run, warmup_s: float, duration_s: float, cpu_s: float) -> LoadResult:
    statuses = {str(k): v for k, v in run.statuses.items()}
    return summarize(
        run.concurrency,
        duration_s,
        warmup_s,
        run.latencies,
        run.statuses.get(200, 0),
        statuses,
        dict(run.errors),
        cpu_s,
    )


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def run_load_sync(port: int, path: str, headers: dict[str, str], body: bytes, **kwargs: Any) -> LoadResult:
    """``run_load`` on a fresh event loop (uvloop when available), hard-bounded in time."""
    limit = kwargs.get("warmup_s", 1.0) + kwargs["duration_s"] + kwargs.get("drain_s", 5.0) + 10.0

    async def bounded() -> LoadResult:
        return await asyncio.wait_for(run_load(port, path, headers, body, **kwargs), limit)

    if _uvloop_installed():
        import uvloop

        return uvloop.run(bounded())
    return asyncio.run(bounded())


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header must be 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--path", default="/", help="request path")
    parser.add_argument("--header", "-H", type=_parse_header, action="append", default=[], help="'Name: value'")
    body = parser.add_mutually_exclusive_group()
    body.add_argument("--body", default="", help="request body (text)")
    body.add_argument("--body-file", type=Path, help="read the request body from this file")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="connections (default 16)")
    parser.add_argument("--duration", "-d", type=float, default=8.0, help="measured seconds (default 8)")
    parser.add_argument("--warmup", "-w", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds (default 10)")
    parser.add_argument("--cpu", type=int, help="pin this process to this CPU before starting")
    parser.add_argument("--cacert", type=Path, help="HTTPS: the CA that verifies the server (default: plain HTTP)")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    payload = args.body_file.read_bytes().strip() if args.body_file else args.body.encode()
    result = run_load_sync(
        args.port,
        args.path,
        dict(args.header),
        payload,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        timeout_s=args.timeout,
        cacert=args.cacert,
    )
    out = asdict(result)
    out["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
