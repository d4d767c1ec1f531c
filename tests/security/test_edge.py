"""The HTTP front door (``bastion.httpserver``), probed from the attacker's side: request heads
bounded in bytes and fields, slow heads and bodies cut off, connections capped per address,
unpredictable request and job ids, no redirect on a trailing slash, gateway metrics off the public
port. Issue 11, findings 1, 2 and part of 7, at small sizes against a real stack."""

from __future__ import annotations

import asyncio
import re
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support import Stack, free_port, http_ok, running, wait_until

PREDICT = "/v1/models/breast-cancer/predict"
ROW = [1.0] * 30
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 2.0
PER_CLIENT = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(
        tmp_path_factory.mktemp("edge"),
        workers=1,
        gateways=1,
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        max_connections_per_client=PER_CLIENT,
    ) as s:
        yield s


def _connect(stack: Stack, source: str = "127.0.0.1") -> socket.socket:
    url = httpx.URL(stack.gateway)
    sock = socket.create_connection((url.host, url.port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body. Status 0: closed without one."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return 0, {}, data
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return 0, {}, data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def _send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it had read everything: the answer is still there to read


def _problem(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict[str, object]:
    assert status == expected, (status, body[:300])
    assert headers["content-type"] == "application/problem+json"
    doc: dict[str, object] = orjson.loads(body)
    assert doc["status"] == expected
    return doc


def _closed_within(sock: socket.socket, dribble: bytes, limit_s: float) -> tuple[float, bytes]:
    """Send ``dribble`` a byte every 0.25 s until the server answers or closes; (seconds, answer)."""
    started = time.monotonic()
    answer = b""
    for i in range(int(limit_s / 0.25)):
        readable, _, _ = select.select([sock], [], [], 0.25)
        if readable:
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
            return time.monotonic() - started, answer
        try:
            sock.send(dribble[i % len(dribble) : i % len(dribble) + 1])
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started, answer
    raise AssertionError(f"the connection was still open after {limit_s} s")


# findings 1: request heads -----------------------------------------------------------------
def test_a_request_head_over_max_header_bytes_is_refused_with_431(stack: Stack) -> None:
    """A 64 KiB header (the limit is 32 KiB for the whole head) gets a 431 problem and a closed
    connection; the parser never sees more than the limit."""
    with _connect(stack) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n")
        doc = _problem(*_read_response(sock), 431)
        assert "32768 bytes" in str(doc["detail"])
        assert sock.recv(1) == b"", "the connection is closed after the refusal"


def test_a_request_with_more_than_max_headers_fields_is_refused_with_431(stack: Stack) -> None:
    """200 small header fields (2 KB, well under the byte limit) are more than the 100 allowed."""
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(200))
    with _connect(stack) as sock:
        _send_all(sock, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        doc = _problem(*_read_response(sock), 431)
        assert "100 header fields" in str(doc["detail"])


def test_a_huge_bearer_token_is_refused_before_it_is_decoded(stack: Stack) -> None:
    """A 1 MiB token is refused at the head limit within a second or two; a 16 KiB one (inside the
    head limit) is a 401 that says the token is too long, before any JWT or key lookup."""
    started = time.monotonic()
    with _connect(stack) as sock:
        _send_all(
            sock, b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"e" * (1 << 20)
        )
        _problem(*_read_response(sock), 431)
    assert time.monotonic() - started < 5
    response = httpx.post(
        stack.gateway + PREDICT, json={"inputs": [ROW]}, headers={"Authorization": "Bearer " + "e" * (16 << 10)}
    )
    assert response.status_code == 401
    assert "longer than 8192 bytes" in response.json()["detail"]


def test_a_request_head_within_the_limits_is_served(stack: Stack) -> None:
    """Close to the limits (90 fields, 20 KB of head) is still an ordinary request."""
    headers = {f"X-F{i}": "v" * 200 for i in range(90)}
    with stack.client(headers=headers) as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200


# finding 2: slow clients ---------------------------------------------------------------------
def test_a_head_dribbled_a_byte_at_a_time_is_cut_off_after_header_timeout(stack: Stack) -> None:
    """A client sending its head at 4 bytes/s gets a 408 and a closed connection after
    ``header_timeout_s`` (1 s here), however long it keeps sending."""
    with _connect(stack) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        elapsed, answer = _closed_within(sock, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", 15)
    assert HEADER_TIMEOUT_S * 0.8 <= elapsed < HEADER_TIMEOUT_S + 8
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(stack: Stack) -> None:
    with _connect(stack) as sock:
        readable, _, _ = select.select([sock], [], [], HEADER_TIMEOUT_S + 8)
        assert readable, "the server closed the idle connection"
        assert sock.recv(1) == b""


def test_a_predict_body_dribbled_slowly_is_answered_408_after_body_timeout(stack: Stack) -> None:
    """A 1,000-byte predict body arriving at 4 bytes/s is a 408 problem after ``body_timeout_s``
    (2 s here), and the gateway keeps serving."""
    key = stack.keys["acme"]
    with _connect(stack) as sock:
        sock.sendall(
            (
                f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"inputs":'
            ).encode()
        )
        elapsed, answer = _closed_within(sock, b"[1.0, 2.0, 3.0, ", 20)
    assert BODY_TIMEOUT_S * 0.8 <= elapsed < BODY_TIMEOUT_S + 10
    status, headers, body = _read_response(_Replay(answer))
    _problem(status, headers, body, 408)
    with stack.client() as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200


class _Replay:
    """A socket-like reader over bytes already received."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, n: int) -> bytes:
        chunk, self.data = self.data[:n], self.data[n:]
        return chunk


# connection caps -------------------------------------------------------------------------------
def test_one_address_holds_at_most_max_connections_per_client_and_others_are_still_served(stack: Stack) -> None:
    """With ``max_connections_per_client`` = 8, the 9th concurrent connection from 127.0.0.1 is
    refused (503, or closed) while the first 8 keep working, and a client at another address
    (127.0.0.2) is served meanwhile."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    held = [_connect(stack) for _ in range(PER_CLIENT)]
    try:
        for sock in held:  # each one in use: a request answered, the connection kept alive
            sock.sendall(request)
            assert _read_response(sock)[0] == 200
        time.sleep(0.2)
        with _connect(stack) as extra:
            _send_all(extra, request)
            status, _, body = _read_response(extra)
            assert status in (0, 503), (status, body[:200])
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, base_url=stack.gateway, timeout=10) as other:
            assert other.get("/healthz").status_code == 200, "another address is not affected"
        for sock in held:
            sock.sendall(request)
            assert _read_response(sock)[0] == 200, "the connections within the cap still work"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10  # the slots are released when the server sees the closes
    while True:
        with _connect(stack) as again:
            _send_all(again, request)
            status = _read_response(again)[0]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, "the closed connections' slots were given back"


def test_slow_attack_connections_are_all_closed_and_another_client_is_served_meanwhile(stack: Stack) -> None:
    """Three times the cap of connections from one address, each dribbling a head: those over the
    cap are refused at once, the rest cut off at ``header_timeout_s``; another address's /healthz
    answers every time meanwhile."""
    attackers = []
    try:
        for _ in range(PER_CLIENT * 3):
            sock = _connect(stack)
            _send_all(sock, b"GET /healthz HTTP/1.1\r\nX-Slow: a")
            attackers.append(sock)
        transport = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(transport=transport, base_url=stack.gateway, timeout=10) as other:
            assert all(other.get("/healthz").status_code == 200 for _ in range(20))
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        open_ = list(attackers)
        while open_ and time.monotonic() < deadline:
            readable, _, _ = select.select(open_, [], [], 0.25)
            for sock in readable:
                try:
                    while sock.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
                open_.remove(sock)
        assert not open_, f"{len(open_)} of {len(attackers)} attack connections still open"
    finally:
        for sock in attackers:
            sock.close()


# finding 7 (part): exposure ----------------------------------------------------------------------
def test_request_ids_and_sync_job_ids_are_unpredictable(stack: Stack) -> None:
    """Generated ids are 64 random bits: distinct, and no two share a prefix a counter would leave."""
    with stack.client() as http:
        responses = [http.post(PREDICT, json={"inputs": [ROW]}) for _ in range(12)]
    request_ids = [r.headers["x-request-id"] for r in responses]
    job_ids = [r.json()["id"] for r in responses]
    for ids in (request_ids, job_ids):
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"s?[0-9a-f]{16}", i) for i in ids), ids
        digits = [i.removeprefix("s") for i in ids]
        assert len({d[:6] for d in digits}) == len(digits), "no shared prefix with a counter after it"


def test_a_trailing_slash_is_a_404_with_no_location(stack: Stack) -> None:
    """No redirect: a 307 would echo the client's Host header in ``Location``."""
    with stack.client(headers={"Host": "evil.example"}) as http:
        for path in ("/v1/models/", "/healthz/", PREDICT + "/"):
            response = http.request("POST" if path.endswith("predict/") else "GET", path)
            assert response.status_code == 404, path
            assert "location" not in response.headers
            assert response.headers["content-type"] == "application/problem+json"


def test_gateway_metrics_are_on_the_private_metrics_port_only(stack: Stack) -> None:
    """``/metrics`` on the public port is the same 404 as an unknown path (model names, versions and
    breaker states are for operators); the gateway's metrics port serves them."""
    public = httpx.get(stack.gateway + "/metrics")
    assert public.status_code == 404
    assert "bastion_" not in public.text
    private = httpx.get(stack.gateway_metrics_url())
    assert private.status_code == 200
    assert "bastion_gateway_request_seconds" in private.text


def test_a_metrics_port_taken_after_the_probe_leaves_metrics_off_without_a_crash(stack: Stack) -> None:
    """The supervisor probes the metrics ports, but one can be taken before the child binds it: the
    gateway and the worker then log ``metrics_port_in_use`` and run on without metrics, instead
    of crashing into a restart loop."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway_port = free_port()
        stack._spawn(
            "gateway-taken",
            ["gateway"],
            {
                "BASTION_GATEWAY_PORT": str(gateway_port),
                "BASTION_GATEWAY_ID": "gw-taken",
                "BASTION_GATEWAY_METRICS_PORT": str(port),
            },
        )
        stack.start_worker(1, BASTION_WORKER_METRICS_PORT=str(port))
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{gateway_port}/readyz"), 60, "the gateway without metrics")
            wait_until(lambda: "metrics_port_in_use" in stack.log("worker-1"), 60, "the worker's warning")
            time.sleep(1.0)  # a crashing worker loop would have died (and been forked again) by now
            for name in ("gateway-taken", "worker-1"):
                assert stack.procs[name].poll() is None, stack.log(name)[-2000:]
                log = stack.log(name)
                assert "metrics_port_in_use" in log and str(port) in log, log[-2000:]
                assert "Traceback" not in log and "worker_loop_died" not in log, log[-2000:]
        finally:
            for name in ("gateway-taken", "worker-1"):
                stack.procs[name].send_signal(signal.SIGTERM)
            for name in ("gateway-taken", "worker-1"):
                stack.procs.pop(name).wait(20)


# the guard in front of the parser, driven in-process (no TCP: every packet boundary is exact) ----
class _Transport:
    """Just enough of an asyncio transport for ``EdgeProtocol``: it records what is written."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.written = b""
        self.closing = False
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": (self.peer, 50000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_a_pipelined_head_carried_by_a_body_packet_is_still_held_to_the_head_limit(tmp_path: Path) -> None:
    """A request whose body packet also carries the next request's head (here 5,000 bytes; the limit
    is 1,024) cannot slip that head past the limit: the parser is fed body bytes at most a limit at
    a time, so the next head is counted and refused with 431 instead of being served."""
    from uvicorn.server import ServerState

    from bastion import httpserver
    from bastion.settings import Settings

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> bytes:
        settings = Settings(data_dir=tmp_path, max_header_bytes=1024)
        config = httpserver.config(app, settings, host="127.0.0.1", port=0)
        protocol = httpserver.protocol_class(httpserver.EdgeLimits.from_settings(settings))(config, ServerState(), {})
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        protocol.data_received(b"hello" + b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 5000 + b"\r\n\r\n")
        for _ in range(20):  # let the app answer whatever reached it
            await asyncio.sleep(0)
        protocol.connection_lost(None)
        return transport.written

    written = asyncio.run(scenario())
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", written)
    assert statuses[-1] == b"431", written[:600]
    assert statuses.count(b"200") <= 1, "the over-long pipelined head was served"


def test_a_body_the_app_answered_without_reading_is_cut_off_however_fast_it_arrives(tmp_path: Path) -> None:
    """An app that answers (as a 401 does) without reading the body leaves the rest unread: the
    connection is closed at ``body_timeout_s`` even while a chunked body keeps arriving faster than
    the floor rate that would earn a body being read more time."""
    from uvicorn.server import ServerState

    from bastion import httpserver
    from bastion.settings import Settings

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # never reads the body
        await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def scenario() -> bool:
        settings = Settings(data_dir=tmp_path, body_timeout_s=0.2)
        config = httpserver.config(app, settings, host="127.0.0.1", port=0)
        protocol = httpserver.protocol_class(httpserver.EdgeLimits.from_settings(settings))(config, ServerState(), {})
        transport = _Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"a" * (64 << 10))
        for _ in range(20):  # 1.25 MiB within the body timeout: 20 s of allowance at the floor rate
            protocol.data_received(chunk)
            await asyncio.sleep(0)
        await asyncio.sleep(0.6)  # the body timer (0.2 s) fires first
        closed = transport.is_closing()
        protocol.connection_lost(None)
        return closed

    assert asyncio.run(scenario()), "the connection is still open, reading a body nobody reads"


def _edge(app: Any, tmp_path: Path, **settings: Any) -> Callable[[str], tuple[Any, _Transport]]:
    """``connect(peer)``: a new connection from ``peer`` to an ``EdgeProtocol`` serving ``app``
    (all connections share one server state, as in one process); call inside a running loop."""
    from uvicorn.server import ServerState

    from bastion import httpserver
    from bastion.settings import Settings

    bound = Settings(data_dir=tmp_path, **settings)
    config = httpserver.config(app, bound, host="127.0.0.1", port=0)
    protocol_class = httpserver.protocol_class(httpserver.EdgeLimits.from_settings(bound))
    state = ServerState()

    def connect(peer: str = "127.0.0.1") -> tuple[Any, _Transport]:
        protocol = protocol_class(config, state, {})
        transport = _Transport(peer)
        protocol.connection_made(transport)
        return protocol, transport

    return connect


async def _ticks(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# review findings: IPv6 networks, pipelining ------------------------------------------------------
def test_an_ipv6_client_is_capped_per_64_network_and_a_mapped_ipv4_one_as_its_ipv4_address(tmp_path: Path) -> None:
    """One subscriber is given a whole IPv6 /64: three addresses of one /64 are one client (the
    third connection is refused with 503 at ``max_connections_per_client`` = 2), another /64 is
    another client, and ``::ffff:192.0.2.7`` is the same client as ``192.0.2.7``."""
    from bastion import httpserver

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("no request is sent")

    async def scenario() -> tuple[list[bytes], dict[str, int]]:
        connect = _edge(app, tmp_path, max_connections_per_client=2)
        peers = ["2001:db8:1:2::1", "2001:db8:1:2::ffff", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:3::1"]
        peers += ["192.0.2.7", "::ffff:192.0.2.7", "::ffff:192.0.2.7"]
        held = [connect(peer) for peer in peers]
        counted = dict(held[0][0].open_by_client)
        for protocol, _ in held:
            protocol.connection_lost(None)
        assert not held[0][0].open_by_client, "every count is given back"
        return [transport.written for _, transport in held], counted

    written, counted = asyncio.run(scenario())
    refused = [w.startswith(b"HTTP/1.1 503 ") for w in written]
    assert refused == [False, False, True, False, False, False, True], written
    assert counted == {"2001:db8:1:2::/64": 3, "2001:db8:1:3::/64": 1, "192.0.2.7": 3}
    assert httpserver.client_network("192.0.2.7") == "192.0.2.7"


def _streams(seen: list[str], finish: asyncio.Event) -> Callable[..., Awaitable[None]]:
    """An app: ``/stream`` is an event stream that runs until ``finish`` is set or the client goes
    away; any other path reads its body and answers 200. ``seen`` records what each request saw."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _stream(scope, receive, send, seen, finish)

    return app


async def _stream(scope: dict[str, Any], receive: Any, send: Any, seen: list[str], finish: asyncio.Event) -> None:
    path = scope["path"]
    if path != "/stream":
        while (message := await receive())["type"] == "http.request" and message.get("more_body"):
            pass
        seen.append(f"{path}:{message['type']}")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    await receive()  # the (empty) request body
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    gone = asyncio.ensure_future(receive())
    finished = asyncio.ensure_future(finish.wait())
    await asyncio.wait([gone, finished], timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if gone.done() and gone.result()["type"] == "http.disconnect":
        seen.append("/stream:disconnect")
    else:
        seen.append("/stream:finished")
        await send({"type": "http.response.body", "body": b"data: 2\n\n"})
    for task in (gone, finished):
        task.cancel()


def test_a_stream_with_a_request_pipelined_behind_it_sees_its_client_go_away(tmp_path: Path) -> None:
    """uvicorn tells only the request it parsed last that the connection is lost; a stream with a
    pipelined request behind it would run on after its client left. Every request on the
    connection sees the disconnect: the stream ends at once."""

    async def scenario() -> list[str]:
        seen: list[str] = []
        finish = asyncio.Event()
        connect = _edge(_streams(seen, finish), tmp_path)
        protocol, _ = connect()
        protocol.data_received(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        await _ticks()
        protocol.connection_lost(None)
        await _ticks()
        return seen

    assert asyncio.run(scenario()) == ["/stream:disconnect"]


def test_a_pipelined_body_deadline_never_writes_into_a_stream_and_starts_when_its_request_runs(
    tmp_path: Path,
) -> None:
    """A request pipelined behind a stream, its body incomplete: its body deadline (0.2 s) passes
    while the stream runs, and no 408 is written into the stream (which keeps running); when the
    stream ends, the request runs and its deadline counts from then: a 408 after the stream's end,
    and the request sees the disconnect."""

    async def scenario() -> tuple[bytes, bytes, list[str]]:
        seen: list[str] = []
        finish = asyncio.Event()
        connect = _edge(_streams(seen, finish), tmp_path, body_timeout_s=0.2)
        protocol, transport = connect()
        protocol.data_received(
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nPOST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        )
        await asyncio.sleep(0.6)  # three body deadlines
        during = transport.written
        finish.set()
        await asyncio.sleep(0.6)
        protocol.connection_lost(None)
        return during, transport.written, seen

    during, written, seen = asyncio.run(scenario())
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", during) == [b"200"], during
    stream_end = written.index(b"data: 2\n\n\r\n0\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", written[stream_end:]) == [b"408"], written
    assert seen == ["/stream:finished", "/next:http.disconnect"]


def test_a_refusal_of_a_pipelined_head_is_never_written_into_a_stream(tmp_path: Path) -> None:
    """An over-long head pipelined behind a stream: the connection is closed (nothing can be
    answered without garbling the stream) and the stream sees the disconnect."""

    async def scenario() -> tuple[bytes, bool, list[str]]:
        seen: list[str] = []
        finish = asyncio.Event()
        connect = _edge(_streams(seen, finish), tmp_path, max_header_bytes=1024)
        protocol, transport = connect()
        protocol.data_received(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await _ticks()
        protocol.data_received(b"GET /next HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 5000)
        await _ticks()
        closing = transport.is_closing()
        protocol.connection_lost(None)
        return transport.written, closing, seen

    written, closing, seen = asyncio.run(scenario())
    assert closing
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", written) == [b"200"], written
    assert seen == ["/stream:disconnect"]
