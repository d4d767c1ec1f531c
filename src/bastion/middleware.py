"""Small pure-ASGI middleware, one concern each: body-size limit, request id, security headers."""

from __future__ import annotations

import re
import time
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import ids, logs, metrics, problems
from bastion.errors import PayloadTooLarge

log = logs.get("bastion.http")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` before reading them (413), chunked bodies included."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    response = problems.respond(  # the shape of the path's protocol (OIP under /v2)
                        scope["path"],
                        413 if declared > 0 else 400,
                        "Payload too large" if declared > 0 else "Invalid input",
                        f"the body is {declared} bytes; the limit is {self.max_bytes}"
                        if declared > 0
                        else "the Content-Length header is not a number",
                        headers={"Connection": "close"},  # uvicorn then closes instead of reading the rest
                    )
                    await response(scope, receive, send)
                    return
                break
        seen = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
            elif message["type"] == "http.disconnect":
                scope.setdefault("state", {})["client_disconnected"] = True  # read by RequestMetrics
            return message

        await self.app(scope, limited_receive, send)


class RequestId:
    """Give every request an id (the client's ``X-Request-ID`` when well-formed), echo it, and
    bind it to every log line written while the request runs (``logs.bind_request``).

    Generated ids are 16 random hex digits (``bastion.ids``: 64 bits from the OS's CSPRNG, read
    a block at a time): unique in practice and unpredictable, so one id tells nothing of another.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
                break
        request_id = request_id or ids.hex_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        token = logs.bind_request(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.clear_request(token)


SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
]


class SecurityHeaders:
    """Add conservative security headers to every response."""

    def __init__(self, app: ASGIApp, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.app = app
        self.headers = SECURITY_HEADERS + (extra or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k for k, _ in message.get("headers", [])}  # ASGI header names are lower case
                message["headers"] = [*message.get("headers", []), *(h for h in self.headers if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestMetrics:
    """Count and time every response by route and status; turn an unexpected exception into a 500.

    The route label is the matched endpoint's name (bounded), or ``unmatched``. Starlette's own
    last-resort handler sits outside every middleware (its response would miss the request id and
    security headers) and re-raises; here the error is logged once, with the request id, answered
    with a bare problem, and the connection stays usable. A client that went away mid-request
    (``ClientDisconnect`` while reading the body, or a socket error after ``http.disconnect``) is
    no error of ours: it is logged at info as ``client_disconnected``, counted as status 499 and
    answered with nothing. (One class for both: each middleware layer costs every request a
    wrapped ``send``.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _observe(self, route: str, status: int, seconds: float) -> None:
        series = self._series.get((route, status))
        if series is None:  # label lookups take a lock; keep the children (bounded: routes × statuses)
            series = (metrics.REQUESTS.labels(route, str(status)), metrics.REQUEST_LATENCY.labels(route))
            self._series[(route, status)] = series
        series[0].inc()
        series[1].observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except Exception as exc:
            if isinstance(exc, ClientDisconnect) or (
                isinstance(exc, OSError) and scope.get("state", {}).get("client_disconnected")
            ):
                metrics.ERRORS.labels("http", "client_disconnected").inc()
                log.info("client_disconnected", path=scope.get("path", ""), error_type=type(exc).__name__)
                status = status or 499  # nginx's "client closed request"; nobody is there to read it
                return
            metrics.ERRORS.labels("http", "unexpected").inc()
            log.error("unexpected_error", path=scope.get("path", ""), error_type=type(exc).__name__, exc_info=exc)
            if status:
                raise
            status = 500
            response = problems.respond(
                scope.get("path"), 500, "Internal error", "an unexpected error occurred; it has been logged"
            )
            await response(scope, receive, send)
        finally:
            route = getattr(scope.get("endpoint"), "__name__", "unmatched")
            self._observe(route, status or 500, time.perf_counter() - started)


def install(app: Any, max_body_bytes: int) -> None:
    """Wrap ``app`` (outermost last): security headers ← request id ← metrics and errors ← body limit."""
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestId)
    app.add_middleware(SecurityHeaders)
