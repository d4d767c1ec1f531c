"""Findings 1, 2, 3 and 7 of issue 11: what anyone who can reach the ports can do, without a key.

Each attack comes from its own loopback address (127.0.0.1x), so a ban or a per-address bound
it earns never touches the victim (127.0.0.3) or the next attack. Every socket is closed before
the attack returns and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import resource
import selectors
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from edges.core import PREDICT, Context, Finding, Report, Scale
from edges.stack import RssWatch
from edges.wire import MIB, Answer, connect, exchange, parse_head, repeat, request_bytes
from edges.wire import REFUSALS as _REFUSALS

SAMPLE_ROW = "[17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589, "
SAMPLE_ROW += "153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019.0, 0.1622, "
SAMPLE_ROW += "0.6656, 0.7119, 0.2654, 0.4601, 0.1189]"
SAMPLE = f'{{"inputs": [{SAMPLE_ROW}]}}'.encode()
# A head the server parsed is answered by the route (200, 401...); these mean it was refused first.
HEAD_REFUSALS = {400, 413, 414, 431, 503}
MIN_ATTACK_S = 5.0  # attacks that are over at once are repeated this long, so the victim window means something


def _head_refused(answer: Answer) -> bool:
    return answer.status is None or answer.status in HEAD_REFUSALS


# 1. headers ------------------------------------------------------------------------------------
def _headers_round(ctx: Context, src: str) -> tuple[list[Answer], Answer, Answer]:
    s, st = ctx.scale, ctx.stack

    def huge(_: int) -> Answer:
        chunks = repeat(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ", b"a", s.header_mb * MIB, b"\r\n\r\n")
        return exchange(st.host, st.gateway_port, src, chunks, timeout_s=30.0)

    with ThreadPoolExecutor(s.header_conns) as pool:
        answers = list(pool.map(huge, range(s.header_conns)))
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(s.header_count))
    many = exchange(st.host, st.gateway_port, src, [b"GET /healthz HTTP/1.1\r\nHost: x\r\n", fields, b"\r\n"])
    head = f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(SAMPLE)}\r\n"
    token = repeat((head + "Authorization: Bearer eyJ").encode(), b"A", s.token_mb * MIB, b"\r\n\r\n" + SAMPLE)
    return answers, many, exchange(st.host, st.gateway_port, src, token)


def _headers(ctx: Context, _state: Any) -> Report:
    """The three header attacks, in rounds, until MIN_ATTACK_S has passed (at least one round)."""
    s, report = ctx.scale, Report()
    started = time.monotonic()
    rounds: list[tuple[list[Answer], Answer, Answer]] = []
    while not rounds or time.monotonic() - started < MIN_ATTACK_S:
        rounds.append(_headers_round(ctx, "127.0.0.11"))
    answers, many, jwt = rounds[0]
    report.got(f"{len(rounds)} rounds in {time.monotonic() - started:.1f} s; the first:")
    report.got(f"{s.header_conns} x {s.header_mb} MB header, GET /healthz: " + "; ".join(a.describe() for a in answers))
    report.got(f"{s.header_count} headers, GET /healthz: {many.describe()}")
    report.got(f"predict with a {s.token_mb} MB bearer token: {jwt.describe()}")
    huge = [a for r in rounds for a in r[0]]
    report.check(
        f"{s.header_mb} MB headers refused (431/400) or closed",
        all(_head_refused(a) for a in huge),
        str(dict(Counter(str(a.status) for a in huge))),
    )
    counted = [r[1] for r in rounds]
    report.check(
        f"{s.header_count} headers refused or closed",
        all(_head_refused(a) for a in counted),
        str(dict(Counter(str(a.status) for a in counted))),
    )
    tokens = [r[2] for r in rounds]
    report.check(
        f"{s.token_mb} MB token refused before auth (431)",
        all(_head_refused(a) for a in tokens),
        str(dict(Counter(str(a.status) for a in tokens))),
    )
    return report


def _raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = soft if hard != resource.RLIM_INFINITY and soft >= hard else max(soft, wanted)
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# 2. slow clients -------------------------------------------------------------------------------
class _Dribbler:
    """Open sockets that each get one more byte per second; records when the server ends each."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.open: dict[int, tuple[socket.socket, bytes]] = {}
        self.ended: dict[int, tuple[float, int | None]] = {}  # id -> (seconds, status or None)
        self.position: dict[int, int] = {}

    def add(self, ident: int, sock: socket.socket, payload: bytes) -> None:
        sock.setblocking(False)
        self.open[ident] = (sock, payload)
        self.position[ident] = 0
        self.selector.register(sock, selectors.EVENT_READ, ident)

    def _end(self, ident: int, at: float, status: int | None) -> None:
        sock, _ = self.open.pop(ident)
        self.ended[ident] = (at, status)
        self.selector.unregister(sock)
        sock.close()

    def tick(self, at: float) -> None:
        for ident, (sock, payload) in list(self.open.items()):
            pos = self.position[ident]
            try:
                sock.send(payload[pos : pos + 1])
                self.position[ident] = min(pos + 1, len(payload) - 1)
            except BlockingIOError:
                pass
            except OSError:
                self._end(ident, at, None)

    def poll(self, at: float, timeout_s: float) -> None:
        for key, _ in self.selector.select(max(timeout_s, 0.0)):
            ident = key.data
            sock, _ = self.open[ident]
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            self._end(ident, at, parse_head(data + b"\r\n\r\n")[0] if data else None)

    def close(self) -> None:
        for sock, _ in self.open.values():
            sock.close()
        self.open.clear()
        self.selector.close()


def _slow_prepare(ctx: Context) -> str:
    return ctx.new_key("attacker-2", "slow-body")[1]


def _slow(ctx: Context, key: str) -> Report:
    s, st, report = ctx.scale, ctx.stack, Report()
    limit = _raise_fd_limit(s.slow_conns + 512)
    dribbler = _Dribbler()
    refused: Counter[str] = Counter()
    started = time.monotonic()
    payload = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64
    try:
        for i in range(s.slow_conns):
            try:
                dribbler.add(i, connect(st.host, st.gateway_port, "127.0.0.12", 3.0), payload)
            except OSError as exc:
                refused[type(exc).__name__] += 1
        connected_s = time.monotonic() - started
        body_head = (
            f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        body_sock = connect(st.host, st.gateway_port, "127.0.0.13", 3.0)
        body_sock.sendall(body_head)
        dribbler.add(-1, body_sock, b" " * 1000)
        origin = time.monotonic()
        next_tick = origin
        while time.monotonic() - origin < s.slow_s and dribbler.open:
            now = time.monotonic()
            if now >= next_tick:
                dribbler.tick(now - origin)
                next_tick += 1.0
            dribbler.poll(time.monotonic() - origin, min(0.2, next_tick - time.monotonic()))
        still = {i for i in dribbler.open if i >= 0}
    finally:
        dribbler.close()
    heads = {i: v for i, v in dribbler.ended.items() if i >= 0}
    opened = s.slow_conns - sum(refused.values())
    by = {t: sum(1 for at, _ in heads.values() if at <= t) for t in (5, 10, 20)}
    statuses = Counter(str(status) if status is not None else "closed" for _, status in heads.values())
    report.got(
        f"{opened} of {s.slow_conns} dribbling connections opened in {connected_s:.1f} s "
        f"(fd limit {limit}; refused at connect: {dict(refused) or 0}); server ended "
        f"{by[5]} by 5 s, {by[10]} by 10 s, {by[20]} by 20 s ({dict(statuses)}); {len(still)} still open "
        f"after {s.slow_s:.0f} s"
    )
    body = dribbler.ended.get(-1)
    if body is None:
        report.got(f"predict with a 1,000-byte body at 1 byte/s: still being read after {s.slow_s:.0f} s")
    else:
        report.got(f"predict with a 1,000-byte body at 1 byte/s: {body[1] or 'closed'} after {body[0]:.1f} s")
    report.check(f"every dribbling head ended by the server within {s.slow_s:.0f} s", not still, f"{len(still)} open")
    report.check(
        f"the slow body answered (408) or closed within {s.slow_s:.0f} s",
        body is not None,
        "still open" if body is None else f"{body[1]} at {body[0]:.1f} s",
    )
    report.figures.update(dribblers_open_at_end=len(still), dribblers_ended_by=by, slow_body=body)
    return report


# 3. admin bodies before auth -------------------------------------------------------------------
def _admin_body(ctx: Context, _state: Any) -> Report:
    s, st, report = ctx.scale, ctx.stack, Report()
    admin_host = st.admin_url.split("//", 1)[1].rsplit(":", 1)[0]
    stop = threading.Event()
    probe_max = [0.0]

    def probe() -> None:
        conn = http.client.HTTPConnection(admin_host, st.control_port, timeout=30.0)
        try:
            while not stop.is_set():
                begun = time.monotonic()
                try:
                    conn.request("GET", "/healthz")
                    conn.getresponse().read()
                except (OSError, http.client.HTTPException):
                    conn.close()
                probe_max[0] = max(probe_max[0], time.monotonic() - begun)
                stop.wait(0.05)
        finally:
            conn.close()

    prober = threading.Thread(target=probe, name="control-probe", daemon=True)
    prober.start()
    size = s.admin_body_mb * MIB
    head = (
        f"POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size + 16}\r\n\r\n"
    ).encode()
    answers: list[Answer] = []
    started = time.monotonic()
    with RssWatch(st.pids().get("control", 0)) as watch:
        while not answers or time.monotonic() - started < MIN_ATTACK_S:
            body = repeat(head + b'{"tenant": "', b"a", size + 16 - len(b'{"tenant": "') - len(b'"}'), b'"}')
            answers.append(exchange(admin_host, st.control_port, "127.0.0.19", body, timeout_s=60.0))
        time.sleep(0.5)
    answer = max(answers, key=lambda a: a.seconds)
    stop.set()
    prober.join(35.0)
    statuses = dict(Counter(str(a.status) for a in answers))
    report.got(
        f"unauthenticated {s.admin_body_mb} MB JSON to POST /admin/v1/keys, {len(answers)} times in "
        f"{time.monotonic() - started:.1f} s: {statuses}; the slowest: {answer.describe()}"
    )
    report.got(f"slowest control-plane /healthz during it: {probe_max[0] * 1000:.0f} ms")
    report.check(
        "refused (401/413) or closed", all(a.status is None or a.status in _REFUSALS for a in answers), str(statuses)
    )
    report.check("each refused within 1 s", answer.seconds <= 1.0, f"slowest {answer.seconds:.2f} s")
    report.check("control plane answered /healthz within 1 s throughout", probe_max[0] <= 1.0, f"{probe_max[0]:.2f} s")
    grown = watch.peak_mb - watch.start_mb
    report.got(f"control-plane RSS {watch.start_mb:.0f} MB -> peak {watch.peak_mb:.0f} MB")
    report.check("control plane grew by less than 32 MB (did not buffer the body)", grown < 32, f"+{grown:.0f} MB")
    report.figures["control_probe_max_s"] = probe_max[0]
    report.figures["answer"] = answer.describe()
    return report


# 7. exposure -----------------------------------------------------------------------------------
def _sequential(ids: list[str]) -> bool:
    """True when consecutive ids differ by a small counter step after a shared prefix."""
    steps = []
    for a, b in itertools.pairwise(ids):
        i = 0
        while i < min(len(a), len(b)) and a[i] == b[i]:
            i += 1
        tail_a, tail_b = a[i:], b[i:]
        try:
            steps.append(abs(int(tail_b, 16) - int(tail_a, 16)))
        except ValueError:
            return False
    return bool(steps) and all(0 < step < 1000 for step in steps)


def _exposure_prepare(ctx: Context) -> str:
    return ctx.new_key("attacker-7", "exposure")[1]


def _ids(ctx: Context, key: str) -> tuple[list[str], list[str]]:
    """Six request ids and six sync job ids, from one keep-alive connection (one gateway)."""
    st = ctx.stack
    request_ids, job_ids = [], []
    conn = http.client.HTTPConnection(st.host, st.gateway_port, timeout=10.0, source_address=("127.0.0.17", 0))
    try:
        for _ in range(6):
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            request_ids.append(response.getheader("X-Request-ID") or "")
        for _ in range(6):
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            conn.request("POST", PREDICT, body=SAMPLE, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            with contextlib.suppress(ValueError):
                job_ids.append(str(json.loads(payload).get("id", "")))
    finally:
        conn.close()
    return request_ids, job_ids


def _exposure(ctx: Context, key: str) -> Report:
    st, report = ctx.stack, Report()
    started = time.monotonic()
    src = "127.0.0.17"
    metrics = exchange(st.host, st.gateway_port, src, [request_bytes("GET", "/metrics", "x", {})], max_body=1 << 20)
    text = metrics.body.decode(errors="replace")
    names_models = "breast-cancer" in text or "bastion_" in text
    report.got(
        f"GET /metrics on the public port: {metrics.status}, {len(metrics.body)} bytes, names models: {names_models}"
    )
    report.check("no metrics on the public port", not (metrics.status == 200 and names_models), str(metrics.status))

    request_ids, job_ids = _ids(ctx, key)
    report.got(f"request ids: {request_ids[0]}, {request_ids[1]}, ...; sync job ids: {', '.join(job_ids[:2])}, ...")
    report.check("request ids not sequential", not _sequential(request_ids), " ".join(request_ids[:3]))
    report.check("sync job ids not sequential", not _sequential(job_ids), " ".join(job_ids[:3]))

    reflected = []
    for path in ("/v1/models/", "/healthz/", f"{PREDICT}/"):
        got = exchange(st.host, st.gateway_port, src, [request_bytes("GET", path, "evil.example", {})])
        location = got.headers.get("location", "")
        report.got(f"GET {path} with Host: evil.example: {got.status}, Location: {location or '-'}")
        if "evil.example" in location:
            reflected.append(path)
    report.check("no Host reflected in a redirect", not reflected, ", ".join(reflected) or "none")

    exposed = "n/a"
    try:
        with connect(st.host, st.control_port, src, 3.0) as sock:
            sock.sendall(request_bytes("GET", "/healthz", "x", {}))
            exposed = "answers" if sock.recv(64).startswith(b"HTTP/") else "accepts connections"
    except OSError as exc:
        exposed = f"not listening ({type(exc).__name__})"
    report.got(f"admin port {st.control_port} on the --host address {st.host}: {exposed}")
    report.check("admin API not bound on --host", exposed.startswith("not listening"), exposed)
    time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))  # a victim window long enough to read
    return report


def _scale_headers(s: Scale) -> str:
    return f"{s.header_conns} conns x {s.header_mb} MB header; {s.header_count} headers; {s.token_mb} MB token"


FINDINGS = [
    Finding(1, "Headers", "unauthenticated", _scale_headers, _headers),
    Finding(
        2,
        "Slow clients",
        "unauthenticated",
        lambda s: f"{s.slow_conns} conns dribbling 1 B/s + 1 slow body, watched {s.slow_s:.0f} s",
        _slow,
        _slow_prepare,
    ),
    Finding(
        3,
        "Admin bodies before auth",
        "unauthenticated",
        lambda s: f"{s.admin_body_mb} MB JSON, no key",
        _admin_body,
    ),
    Finding(
        7,
        "Exposure",
        "unauthenticated",
        lambda s: "a few requests",
        _exposure,
        _exposure_prepare,
    ),
]
