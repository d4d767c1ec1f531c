"""Findings 4, 5 and 6 of issue 11: what one tenant's key (or the admin key, for uploads) can grow.

4 submits large async jobs as fast as four connections can; 5 holds as many job event streams
(SSE) as it can on one job that never ends (a model no worker serves: the stack runs with
``--worker-models breast-cancer``) and then has its key revoked; 6 uploads a protobuf bomb and
registers an unrouted version with large label metadata. Every socket is closed and every
wait bounded before an attack returns.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edges.core import MODEL, Context, Finding, Report, Scale
from edges.front import SAMPLE_ROW
from edges.stack import RssWatch, cpu_times
from edges.wire import MIB, connect, parse_head, request_bytes

DEMO_ONNX = Path(__file__).resolve().parents[2] / "src" / "bastion" / "demo" / "breast_cancer.onnx"
PARKED = "edges-parked"  # a model no worker of the stack serves: its jobs stay queued
STORED_RESULT_BOUND = 4 << 20  # --max-stored-result-bytes for this run (bench_edges.BOUND_FLAGS)
STREAMS_PER_KEY = 16  # --max-streams-per-key for this run (bench_edges.BOUND_FLAGS)


# 4. storage ------------------------------------------------------------------------------------
@dataclass
class _Jobs:
    key: str
    body: bytes
    rows: int
    statuses: Counter[int] = field(default_factory=Counter)
    details: dict[int, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)


def _jobs_body(rows: int) -> bytes:
    return ('{"inputs": [' + ", ".join([SAMPLE_ROW] * rows) + "]}").encode()


def _submit(conn: http.client.HTTPConnection, key: str, body: bytes, model: str = MODEL) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn.request("POST", f"/v1/models/{model}/jobs", body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    try:
        return response.status, json.loads(payload)
    except ValueError:
        return response.status, {}


def _storage_prepare(ctx: Context) -> _Jobs:
    key = ctx.new_key("attacker-4", "storage")[1]
    st = ctx.stack
    rows = 1024  # the default max_rows
    with contextlib.closing(http.client.HTTPConnection(st.host, st.gateway_port, timeout=10.0)) as conn:
        for _ in range(6):
            status, _ = _submit(conn, key, _jobs_body(rows))
            if status == 202:
                break
            rows //= 2
    return _Jobs(key, _jobs_body(rows), rows)


def _storage(ctx: Context, jobs: _Jobs) -> Report:
    s, st, report = ctx.scale, ctx.stack, Report()
    used_before = int(ctx.stack.redis_info()["used_memory"])
    deadline = time.monotonic() + s.job_s
    lock = threading.Lock()

    def flood(i: int) -> None:
        conn = http.client.HTTPConnection(
            st.host, st.gateway_port, timeout=10.0, source_address=(f"127.0.0.{40 + i}", 0)
        )
        try:
            while time.monotonic() < deadline:
                try:
                    status, doc = _submit(conn, jobs.key, jobs.body)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    status, doc = 0, {}
                with lock:
                    jobs.statuses[status] += 1
                    if status == 202:
                        jobs.ids.append(str(doc.get("id", "")))
                    elif status not in jobs.details:
                        jobs.details[status] = str(doc.get("detail", ""))[:160]
        finally:
            conn.close()

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(s.job_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(s.job_s + 15)
    drained = _drain(ctx, jobs.ids, 20.0)
    stored, ttl = _stored(ctx, jobs.ids)
    used_after = int(ctx.stack.redis_info()["used_memory"])
    report.got(
        f"{jobs.rows}-row jobs for {s.job_s:.0f} s: {dict(jobs.statuses)} "
        f"({sum(jobs.statuses.values()) / s.job_s:.0f}/s); queue drained: {drained}"
    )
    for status, detail in jobs.details.items():
        report.got(f"  {status}: {detail or '(no detail)'}")
    each = stored / max(len(jobs.ids), 1)
    report.got(
        f"stored: {len(jobs.ids)} results, {stored / MIB:.1f} MB ({each / 1024:.1f} KB each), kept {ttl} s; "
        f"Redis used_memory {used_before / MIB:.1f} -> {used_after / MIB:.1f} MB"
    )
    report.got("dead letters: not replayed (needs jobs that fail three deliveries)")
    report.check(
        f"the tenant's stored results within --max-stored-result-bytes {STORED_RESULT_BOUND / MIB:.0f} MB "
        "(+10% for jobs in flight)",
        stored <= STORED_RESULT_BOUND * 1.1,
        f"{stored / MIB:.1f} MB",
    )
    report.figures.update(statuses=dict(jobs.statuses), stored_bytes=stored, result_ttl_s=ttl)
    return report


def _drain(ctx: Context, ids: list[str], timeout_s: float) -> bool:
    """Wait until the last accepted job has ended (the worker takes them in order)."""
    if not ids:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = ctx.stack.redis.hget(f"job:{ids[-1]}", "status")
        if status in (b"succeeded", b"failed", b"expired", b"dead_lettered", None):
            return True
        time.sleep(0.2)
    return False


def _stored(ctx: Context, ids: list[str]) -> tuple[int, int]:
    """Bytes of the results of ``ids`` held in Redis, and the TTL of one of them."""
    total = 0
    pipe = ctx.stack.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hstrlen(f"job:{job_id}", "result")
    for length in pipe.execute():
        total += int(length)
    ttl = int(ctx.stack.redis.ttl(f"job:{ids[0]}")) if ids else -2
    return total, ttl


# 5. streams ------------------------------------------------------------------------------------
@dataclass
class _Stream:
    sock: socket.socket
    status: int | None = None
    head: bytes = b""
    tail: bytes = b""
    ended_at: float | None = None


def _streams_prepare(ctx: Context) -> tuple[str, str, str]:
    with contextlib.suppress(Exception):  # registered by an earlier replay in the same run
        ctx.admin.register(PARKED, DEMO_ONNX.read_bytes(), description="edge benchmark: no worker serves it")
    key_id, key = ctx.new_key("attacker-5", "streams")
    st = ctx.stack
    with contextlib.closing(http.client.HTTPConnection(st.host, st.gateway_port, timeout=10.0)) as conn:
        for _ in range(100):
            status, doc = _submit(conn, key, f'{{"inputs": [{SAMPLE_ROW}]}}'.encode(), PARKED)
            if status == 202:
                return key_id, key, str(doc["id"])
            time.sleep(0.2)
    raise RuntimeError(f"could not queue a job on {PARKED}: {status} {str(doc.get('detail', ''))[:200]}")


class _Streams:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.streams: list[_Stream] = []
        self.refused: Counter[str] = Counter()

    def open(self, ctx: Context, job_id: str, key: str, count: int) -> None:
        st = ctx.stack
        request = request_bytes("GET", f"/v1/jobs/{job_id}/events", "x", {"Authorization": f"Bearer {key}"})
        for _ in range(count):
            try:
                sock = connect(st.host, st.gateway_port, "127.0.0.15", 3.0)
                sock.sendall(request)
            except OSError as exc:
                self.refused[f"connect {type(exc).__name__}"] += 1
                continue
            sock.setblocking(False)
            stream = _Stream(sock)
            self.streams.append(stream)
            self.selector.register(sock, selectors.EVENT_READ, stream)

    def _end(self, stream: _Stream, at: float) -> None:
        stream.ended_at = at
        self.selector.unregister(stream.sock)
        stream.sock.close()

    def pump(self, seconds: float, origin: float) -> None:
        """Read whatever arrives for ``seconds``; a stream ends on EOF or its last chunk."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and self.selector.get_map():
            for key, _ in self.selector.select(max(0.0, min(0.2, until - time.monotonic()))):
                stream: _Stream = key.data
                try:
                    data = stream.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._end(stream, time.monotonic() - origin)
                    continue
                if stream.status is None:
                    stream.head += data
                    stream.status, _, rest = parse_head(stream.head)
                    data = rest if stream.status is not None else b""
                    if stream.status is not None and stream.status != 200:
                        self.refused[str(stream.status)] += 1
                        self._end(stream, time.monotonic() - origin)
                        continue
                stream.tail = (stream.tail + data)[-16:]
                if stream.tail.endswith(b"\r\n0\r\n\r\n") or stream.tail == b"0\r\n\r\n":
                    self._end(stream, time.monotonic() - origin)

    def accepted(self) -> list[_Stream]:
        return [s for s in self.streams if s.status == 200]

    def close(self) -> None:
        for stream in self.streams:
            if stream.ended_at is None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(stream.sock)
                stream.sock.close()
        self.selector.close()


def _streams(ctx: Context, state: tuple[str, str, str]) -> Report:
    key_id, key, job_id = state
    s, st, report = ctx.scale, ctx.stack, Report()
    streams = _Streams()
    try:
        origin = time.monotonic()
        streams.open(ctx, job_id, key, s.streams)
        streams.pump(5.0, origin)
        accepted = streams.accepted()
        silent = sum(1 for x in streams.streams if x.status is None and x.ended_at is None)
        open_now = [x for x in accepted if x.ended_at is None]
        pids = {k: v for k, v in st.pids().items() if k.startswith("gateway")}
        cpu0, info0, t0 = cpu_times(pids), st.redis_info(), time.monotonic()
        streams.pump(s.stream_hold_s, origin)
        cpu1, info1, held = cpu_times(pids), st.redis_info(), time.monotonic() - t0
        ops = (int(info1["total_commands_processed"]) - int(info0["total_commands_processed"])) / held
        gw_cpu = sum(100 * (cpu1[n] - cpu0[n]) / held for n in cpu1 if n in cpu0)
        revoked_at = time.monotonic()
        ctx.admin.revoke_key(key_id)
        streams.pump(s.revoke_watch_s, origin)
        still = [x for x in open_now if x.ended_at is None]
        closed_after = sorted(x.ended_at - (revoked_at - origin) for x in open_now if x.ended_at is not None)
    finally:
        streams.close()
    report.got(
        f"{len(accepted)} of {s.streams} streams accepted (refused: {dict(streams.refused) or 0}; no answer in 5 s: "
        f"{silent}); "
        f"{len(open_now)} held {s.stream_hold_s:.0f} s: Redis {ops:.0f} cmds/s, gateways {gw_cpu:.0f}% CPU"
    )
    last = f", the last {closed_after[-1]:.1f} s after" if closed_after else ""
    report.got(
        f"key revoked: {len(open_now) - len(still)} streams ended{last}; {len(still)} still open after "
        f"{s.revoke_watch_s:.0f} s"
    )
    report.check(
        f"streams of one key capped (--max-streams-per-key {STREAMS_PER_KEY})",
        len(accepted) <= STREAMS_PER_KEY,
        f"{len(accepted)} accepted",
    )
    report.check(
        f"every stream ended within {s.revoke_watch_s:.0f} s of its key's revocation", not still, f"{len(still)} open"
    )
    report.figures.update(accepted=len(accepted), redis_ops_s=ops, gateway_cpu_pct=gw_cpu, open_after_revoke=len(still))
    return report


# 6. uploads and snapshot -----------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bomb(size: int) -> bytes:
    """An ONNX model whose one INT64 initializer packs ``size`` zero varints (``size`` int64s)."""
    tensor = _varint(1 << 3) + _varint(size)  # dims: [size]
    tensor += _varint(2 << 3) + _varint(7)  # data_type: INT64
    tensor += _len_field(8, b"w")  # name
    tensor += _len_field(7, bytes(size))  # int64_data, packed: every byte one zero varint
    graph = _len_field(5, tensor) + _len_field(2, b"g")
    opset = _varint(2 << 3) + _varint(17)
    return _varint(1 << 3) + _varint(8) + _len_field(8, opset) + _len_field(7, graph)


def _labels(total: int) -> dict[str, Any]:
    """About ``total`` bytes of output labels (at most 10,000 labels, the schema's limit)."""
    count = max(min(10_000, total // 40), 1)
    per = max(total // count - 4, 6)
    labels = [f"{i:05d}" + "x" * (per - 5) for i in range(count)]
    return {"signature": {"outputs": {"label": {"labels": labels}}}}


def _netout(ctx: Context, seconds: float) -> float:
    before = int(ctx.stack.redis_info()["total_net_output_bytes"])
    time.sleep(seconds)
    return (int(ctx.stack.redis_info()["total_net_output_bytes"]) - before) / seconds


def _uploads(ctx: Context, _state: Any) -> Report:
    s, st, report = ctx.scale, ctx.stack, Report()
    data = bomb(s.bomb_mb * MIB)
    headers = {"Authorization": f"Bearer {st.admin_key}", "Content-Type": "application/octet-stream"}
    started = time.monotonic()
    with RssWatch(st.pids().get("control", 0)) as watch:
        try:
            got = httpx.post(
                f"{st.admin_url}/admin/v1/models/edges-bomb/versions", content=data, headers=headers, timeout=120.0
            )
            try:
                detail = str(got.json().get("detail", ""))
            except ValueError:
                detail = got.text
            outcome = f"{got.status_code} {detail[:140]}"
        except httpx.HTTPError as exc:
            outcome = f"no answer ({type(exc).__name__})"
    del data
    report.got(
        f"{s.bomb_mb} MB ONNX of zero varints: {outcome} after {time.monotonic() - started:.1f} s; control plane "
        f"{watch.start_mb:.0f} -> peak {watch.peak_mb:.0f} MB, its children peak {watch.peak_children_mb:.0f} MB"
    )
    report.check(
        "control plane's own RSS under 1024 MB during the bomb", watch.peak_mb <= 1024, f"{watch.peak_mb:.0f} MB"
    )

    snap_before = int(st.redis.strlen("snap:current"))
    out_before = _netout(ctx, s.netout_s)
    accepted_mb = 0.0
    for mb in (s.metadata_mb, 0.03):
        try:
            ctx.admin.register(
                MODEL,
                DEMO_ONNX.read_bytes(),
                description="edge benchmark",
                activate=False,
                metadata=_labels(int(mb * MIB)),
            )
            report.got(f"unrouted version with {mb:g} MB of labels: registered")
            accepted_mb = mb
            break
        except Exception as exc:
            report.got(f"unrouted version with {mb:g} MB of labels: {str(exc)[:160]}")
    deadline = time.monotonic() + 12.0
    snap_after = snap_before
    while time.monotonic() < deadline:
        snap_after = int(st.redis.strlen("snap:current"))
        if snap_after != snap_before:
            break
        time.sleep(0.25)
    out_after = _netout(ctx, s.netout_s)
    grew = snap_after - snap_before
    report.got(
        f"snapshot {snap_before / 1024:.0f} -> {snap_after / 1024:.0f} KB; Redis output {out_before / 1024:.0f} -> "
        f"{out_after / 1024:.0f} KB/s (victim load running)"
    )
    report.check(
        f"{s.metadata_mb} MB of metadata refused", accepted_mb != s.metadata_mb, f"accepted {accepted_mb:g} MB"
    )
    report.check(
        "an unrouted version leaves the snapshot (< 256 KB growth)", grew < 256 << 10, f"+{grew / 1024:.0f} KB"
    )
    report.check(
        "Redis output grew by < 1 MB/s", out_after - out_before < MIB, f"+{(out_after - out_before) / 1024:.0f} KB/s"
    )
    report.figures.update(snapshot_bytes=snap_after, netout_before=out_before, netout_after=out_after)
    return report


FINDINGS = [
    Finding(
        4,
        "Storage",
        "tenant",
        lambda s: f"{s.job_threads} conns of max-row async jobs for {s.job_s:.0f} s",
        _storage,
        _storage_prepare,
    ),
    Finding(
        5,
        "Streams",
        "tenant",
        lambda s: f"up to {s.streams} SSE streams on one job, then revoke",
        _streams,
        _streams_prepare,
    ),
    Finding(
        6,
        "Uploads and snapshot",
        "tenant",
        lambda s: f"{s.bomb_mb} MB protobuf bomb; {s.metadata_mb} MB labels",
        _uploads,
    ),
]


def scales(s: Scale) -> dict[int, str]:
    return {f.number: f.scale(s) for f in FINDINGS}
