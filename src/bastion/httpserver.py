"""The HTTP front door of every Bastion HTTP process: uvicorn with httptools, and a guard in front
of the parser.

uvicorn's httptools protocol has no bound on a request head, no head-read timeout and no body
deadline, and accepts every connection. ``EdgeProtocol`` (a subclass, one instance per
connection) adds them; ``config`` builds the one ``uvicorn.Config`` every process uses. What it
guarantees, per HTTP process:

* **Head bytes.** At most ``max_header_bytes`` of a request head (request line and headers) reach
  the parser: the bytes of each packet are counted before it is fed, and a head still open at the
  limit is answered 431 and the connection closed. (httptools accumulates a header by
  concatenation, so an unbounded head costs more than linear CPU.) A pipelined head that starts in
  the packet ending the request before it is counted from the next packet on, and body bytes are fed
  at most a limit at a time, so such a head reaches at most twice the limit.
* **Header count.** A head with more than ``max_headers`` fields is answered 431 and closed when it
  ends (counted once, not per field: the byte limit already bounds the parsing).
* **Head-read timeout.** A connection gets ``header_timeout_s`` from its opening, and each later
  request from its first byte, to complete its head; then it is answered 408 (nothing if it sent
  nothing) and closed. Idle keep-alive connections close after uvicorn's keep-alive timeout.
* **TLS handshake timeout.** Over TLS, a handshake must finish within ``header_timeout_s`` too
  (``EdgeLoop``; asyncio's default is 60 s), else the connection is closed; the head-read timeout
  and the connection caps start once it has.
* **Body deadline.** A body that does not arrive with its head must be complete within
  ``body_timeout_s`` plus one second per ``MIN_BODY_RATE`` bytes received after the head's packet
  (a floor on the rate, so large uploads on slow links still pass); else 408 and closed, and the
  app's ``receive`` sees a disconnect. A body the app answered without reading (a 401, a 413) earns
  no extra time: the connection closes at ``body_timeout_s`` however fast the rest arrives.
* **Connection caps.** A client holds at most ``max_connections_per_client`` open connections
  and the process at most ``max_connections``; one more is answered 503 at once and closed. A
  client is an IPv4 address, or an IPv6 /64 network (``client_network``: one subscriber is given a
  whole /64, so counting addresses would not bound it); an IPv4-mapped IPv6 address is its IPv4
  one. Addresses in ``trusted_proxies`` (a load balancer carries many clients) have only the
  process cap. uvicorn's ``limit_concurrency`` bounds requests in flight the same way.
* **Pipelining.** When the connection is lost or refused, every request on it sees the
  disconnect: the one running, even when the parser has moved on to a later one, and those
  queued behind it (uvicorn tells only the request it parsed last), so a stream never outlives its
  client. A refusal is never written into a response already under way (the connection is just
  closed), and the body deadline of a pipelined request starts when its request starts to run.
  ``X-Forwarded-For`` is never read here (uvicorn's proxy headers are off): the abuse guard believes
  it only from ``trusted_proxies``.

The hot path pays one comparison and one addition per packet and nothing per request whose head
(and body) arrive in one packet: timers are armed only at connection start and when a head or body
spans packets. Refusals are pre-rendered ``application/problem+json`` responses (the mapping of
``bastion.errors`` stays in ``problems``), counted in ``bastion_errors_total{process="edge"}``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httptools
import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from bastion import metrics, middleware, problems
from bastion.errors import BastionError, HeadersTooLarge, Overloaded, RequestTimeout
from bastion.security.tls import ServerTLS
from bastion.settings import Settings

MIN_BODY_RATE = 64 << 10  # bytes/s: each one earns a body this much more time beyond body_timeout_s


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    max_connections_per_client: int
    proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    @classmethod
    def from_settings(cls, settings: Settings) -> EdgeLimits:
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
            max_connections_per_client=settings.max_connections_per_client,
            proxies=tuple(
                ipaddress.ip_network(p.strip(), strict=False) for p in settings.trusted_proxies.split(",") if p.strip()
            ),
        )

    def capped(self, host: str) -> bool:
        """Whether ``host`` has a per-address connection cap (every address but a trusted proxy's)."""
        if not self.proxies:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return True
        return not any(ip in net for net in self.proxies)


def client_network(host: str) -> str:
    """The client ``host`` is counted as: an IPv4 address as it is, an IPv6 address as its /64
    network (``2001:db8:1:2::/64``), an IPv4-mapped IPv6 address as the IPv4 address; anything
    that is not an IPv6 address as it is. One string test for IPv4 (the common case)."""
    if ":" not in host:
        return host
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(int(ip) >> 64 << 64)}/64"


def render(exc: BastionError) -> bytes:
    """``exc`` as a complete HTTP/1.1 response that closes the connection."""
    response = problems.from_error(exc)
    lines = [STATUS_LINE[response.status_code]]
    for name, value in [*response.raw_headers, *middleware.SECURITY_HEADERS, (b"connection", b"close")]:
        lines += [name, b": ", value, b"\r\n"]
    return b"".join([*lines, b"\r\n", bytes(response.body)])


@dataclass(frozen=True, slots=True)
class _Refusals:
    head_too_large: bytes
    too_many_headers: bytes
    head_timeout: bytes
    body_timeout: bytes
    client_connections: bytes
    connections: bytes

    @classmethod
    def of(cls, limits: EdgeLimits) -> _Refusals:
        return cls(
            head_too_large=render(HeadersTooLarge(f"the request head exceeds {limits.max_header_bytes} bytes")),
            too_many_headers=render(HeadersTooLarge(f"the request has more than {limits.max_headers} header fields")),
            head_timeout=render(RequestTimeout(f"the request head took longer than {limits.header_timeout_s:g} s")),
            body_timeout=render(
                RequestTimeout(
                    f"the request body took longer than {limits.body_timeout_s:g} s "
                    f"(plus 1 s per {MIN_BODY_RATE} bytes received)"
                )
            ),
            client_connections=render(
                Overloaded(f"this address holds {limits.max_connections_per_client} open connections, the limit")
            ),
            connections=render(Overloaded(f"the server holds {limits.max_connections} open connections, the limit")),
        )


class _TooManyHeaders(Exception):
    """Raised from the parser's callback to stop at a head with too many fields."""


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; use ``protocol_class`` to bind them."""

    limits: ClassVar[EdgeLimits]
    refusals: ClassVar[_Refusals]
    open_by_client: ClassVar[dict[str, int]]  # this process's open connections by client_network

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host: str | None = None  # the client_network counted in open_by_client
        self._running: RequestResponseCycle | None = None  # the request whose app was started last
        self._head_open = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes of the open head counted so far
        self._heads = 0  # heads completed on this connection
        self._too_many_headers = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_started = 0.0
        self._body_bytes = 0  # bytes received after the packet that completed the head
        self._max_head = self.limits.max_header_bytes
        self._max_headers = self.limits.max_headers
        self._tls: dict[str, Any] | None = None  # the ASGI "tls" extension, for a client certificate

    # connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # over TLS, the handshake is done: a verified client certificate?
            self._tls = client_certificate(ssl_object.getpeercert(binary_form=True))
        if self.client is not None and self.limits.capped(self.client[0]):
            host = client_network(self.client[0])
            held = self.open_by_client.get(host, 0) + 1
            self.open_by_client[host] = held
            self._host = host
            if held > self.limits.max_connections_per_client:
                self._refuse(self.refusals.client_connections, "too_many_connections_per_client")
                return
        if len(self.connections) > self.limits.max_connections:
            self._refuse(self.refusals.connections, "too_many_connections")
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._disconnect_all()
        if self._host is not None:
            left = self.open_by_client[self._host] - 1
            if left:
                self.open_by_client[self._host] = left
            else:
                del self.open_by_client[self._host]
            self._host = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        step = self._max_head
        while not self._head_open and len(data) > step:
            # Body bytes go to the parser at most a head limit at a time: a packet that ends its
            # body may carry the next request's head, and what of it shares a slice with the body
            # end is not counted; in slices that is under one limit (as in a head-mode packet).
            self._body_bytes += step
            try:
                self.parser.feed_data(data[:step])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._parse_failed(exc)
                return
            if self.transport.is_closing():
                return
            data = data[step:]
        if self._head_open:
            if self._head_bytes + len(data) > self._max_head:
                self._receive_past_head_limit(data)
                return
            self._head_bytes += len(data)
        else:
            self._body_bytes += len(data)  # a later packet of a body (or of pipelined requests)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._parse_failed(exc)
            return
        if self._head_open:
            if self._head_bytes and self._head_timer is None:  # a head spans packets: time it
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._body_timer is None and not self.transport.is_closing():  # a body spans packets: time it
            self._time_body(afresh=False)

    def _receive_past_head_limit(self, data: bytes) -> None:
        """Feed the open head no further than the limit; what follows may be body or more requests."""
        limit = self._max_head
        while self._head_open and self._head_bytes + len(data) > limit:
            fits = limit - self._head_bytes
            self._head_bytes = limit  # on_message_complete resets it if a request ends in ``fits``
            heads = self._heads
            if fits:
                try:
                    self.parser.feed_data(data[:fits])
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                    self._parse_failed(exc)
                    return
                if self.transport.is_closing():
                    return
            if self._heads == heads:
                self._refuse(self.refusals.head_too_large, "head_too_large")
                return
            data = data[fits:]
        if data:
            self.data_received(data)

    def send_400_response(self, msg: str) -> None:
        if self._under_way():
            self._disconnect_all()  # a response is under way: a 400 written now would garble it
            self.transport.close()
            return
        super().send_400_response(msg)

    def _parse_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._unsupported_upgrade_warning()  # no WebSocket here (ws="none")
        elif self._too_many_headers:
            self._refuse(self.refusals.too_many_headers, "too_many_headers")
        else:
            self.send_400_response("Invalid HTTP request received.")

    # parser callbacks --------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        if len(self.headers) > self._max_headers:  # bounded work: the head is within its byte limit
            self._too_many_headers = True
            raise _TooManyHeaders
        self._head_open = False
        self._heads += 1
        self._body_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._tls is not None:
            extensions: dict[str, Any] = dict(self.scope.get("extensions") or {})
            extensions["tls"] = self._tls
            self.scope["extensions"] = extensions  # type: ignore[typeddict-item]
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_open = True
        self._head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # timers and refusals -----------------------------------------------------------------
    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_open or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(self.refusals.head_timeout, "head_timeout")
        else:
            self.transport.close()  # it sent nothing: nobody to answer

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        if cycle is self.cycle and self._body_timer is not None:  # a pipelined request whose body is
            self._time_body()  # still arriving starts to run: its deadline counts from now
        super()._start_asgi_task(cycle, app)

    def _time_body(self, *, afresh: bool = True) -> None:
        """(Re)start the body deadline from now; ``afresh``: bytes received so far earn nothing."""
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_started = self.loop.time()
        if afresh:
            self._body_bytes = 0
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self._head_open or self.transport.is_closing():
            return
        cycle = self.cycle
        running = self._running
        if running is not cycle and running is not None and not running.response_complete:
            self._time_body()  # pipelined behind a response under way: nobody reads its body yet
            return
        if cycle is not None and cycle.response_complete:  # answered, and nobody reads the rest of
            metrics.ERRORS.labels("edge", "body_timeout").inc()  # the body: it earns no more time
            self.transport.close()
            return
        allowed = self.limits.body_timeout_s + self._body_bytes / MIN_BODY_RATE
        remaining = self._body_started + allowed - self.loop.time()
        if remaining > 0.001:  # the body is arriving at the floor rate or faster: it earned more time
            self._body_timer = self.loop.call_later(remaining, self._body_timed_out)
            return
        if cycle is not None and cycle.response_started:
            metrics.ERRORS.labels("edge", "body_timeout").inc()
            self.transport.close()  # answered already (without reading the body): just close
            return
        self._refuse(self.refusals.body_timeout, "body_timeout")

    def _refuse(self, response: bytes, reason: str) -> None:
        """Answer ``response`` and close; every request in progress sees a disconnect. Into a
        response already under way nothing is written (it would garble it): the connection closes."""
        metrics.ERRORS.labels("edge", reason).inc()
        self._head_open = False
        self._cancel_timers()
        under_way = self._under_way()
        self._disconnect_all()
        if not under_way:
            self.transport.write(response)
        self.transport.close()

    def _cycles(self) -> list[RequestResponseCycle]:
        """Every request of this connection that may still be answered: the one running, the one
        parsed last (``self.cycle``) and those queued between them."""
        found = [c for c, _app in self.pipeline]
        for cycle in (self._running, self.cycle):
            if cycle is not None and all(cycle is not c for c in found):
                found.append(cycle)
        return found

    def _under_way(self) -> bool:
        """Whether a response has started and not ended: nothing else may be written now."""
        return any(c.response_started and not c.response_complete for c in self._cycles())

    def _disconnect_all(self) -> None:
        """The apps' sends are dropped from now on and their ``receive`` returns a disconnect."""
        for cycle in self._cycles():
            if not cycle.response_complete:
                cycle.disconnected = True
            cycle.message_event.set()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


def client_certificate(der: bytes | None) -> dict[str, Any] | None:
    """The ASGI TLS extension's client fields for a verified peer certificate (None: none sent),
    with ``client_cn``, its common name (the admin API maps it to a principal)."""
    if not der:
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return {
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
        "client_cert_name": cert.subject.rfc4514_string(),
        "client_cert_error": None,
        "client_cn": str(names[0].value) if names else None,
    }


class EdgeLoop(uvloop.Loop):
    """uvloop, whose TLS listeners give a handshake ``handshake_timeout_s`` (the head-read
    timeout), not asyncio's 60 s: a connection that opens and never finishes its handshake is
    closed as soon as one that never finishes its head (the caps count a connection once its
    handshake is done, so this bounds how long an unfinished one is held)."""

    handshake_timeout_s: ClassVar[float] = 10.0

    async def create_server(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self.handshake_timeout_s)
        return await super().create_server(*args, **kwargs)


def edge_loop() -> asyncio.AbstractEventLoop:
    """The loop factory uvicorn is given (``loop="bastion.httpserver:edge_loop"``)."""
    return EdgeLoop()


def protocol_class(limits: EdgeLimits) -> type[EdgeProtocol]:
    """``EdgeProtocol`` bound to ``limits``, with its own per-address connection counts."""

    class BoundEdgeProtocol(EdgeProtocol):
        pass

    BoundEdgeProtocol.limits = limits
    BoundEdgeProtocol.refusals = _Refusals.of(limits)
    BoundEdgeProtocol.open_by_client = {}
    return BoundEdgeProtocol


def config(
    app: Any, settings: Settings, *, host: str, port: int, tls: ServerTLS | None = None, **options: Any
) -> uvicorn.Config:
    """The ``uvicorn.Config`` of a Bastion HTTP process serving ``app`` (``options``: uvicorn's own,
    e.g. ``fd`` or ``backlog``); with ``tls``, HTTPS on its reloading context."""
    limits = EdgeLimits.from_settings(settings)
    if tls is not None:
        options["ssl_context_factory"] = lambda _config, _default: tls.context
    EdgeLoop.handshake_timeout_s = limits.header_timeout_s
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="bastion.httpserver:edge_loop",
        http=protocol_class(limits),
        ws="none",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
        proxy_headers=False,  # the client is the socket's peer; X-Forwarded-For only via trusted_proxies
        # In flight: uvicorn answers 503 beyond this; open connections are capped in EdgeProtocol.
        limit_concurrency=limits.max_connections + 1,
        **options,
    )
