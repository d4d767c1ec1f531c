"""The admin API's front door: who is calling is settled before any body is read, and a JSON
admin body is bounded before it is parsed.

``AdminGate`` (pure ASGI, inside the app-wide body limit of ``max_upload_bytes``) takes every
request of the control plane:

1. Under ``/admin/``, it resolves the principal from the ``Authorization`` header alone
   (``principals.resolve``: one digest lookup, off the event loop, as the route dependency did
   before) and leaves it in ``scope["state"]`` for the ``principal`` dependency. A request without a valid principal is
   answered 401 (or 403 for another tenant's key) at once: its body is never read, and a request
   that declared one is answered with ``Connection: close`` so that the server drops the
   connection instead of reading the rest of the body. The answer is the same for every body
   size and for every wrong key.
   If the principal cannot be settled (SQL unreachable: ``Unavailable``, 503), the error is
   answered as its problem; anything unexpected is logged once and answered with a bare 500
   problem (no detail). Either way, with ``Connection: close`` when a body was declared.
2. It bounds the body by its route: an artifact upload keeps the app-wide ``max_upload_bytes``;
   every other ``/admin/`` route takes at most ``max_admin_body_bytes`` (1 MiB by default). A
   larger ``Content-Length`` is refused (413) before anything is read; a chunked body is read up
   to the limit (so at most that much is buffered) before the route sees it, and refused past it.
3. It digests the body as it streams through (``AdminCall``): every byte the route receives
   goes through SHA-256 once, on its way, so an artifact upload is hashed without being held
   twice. The unit of work (``bastion.control.changes``) reads the call's route template and
   that digest (``current_call``) and records both with the change, for the decision log.
4. Outside ``/admin/`` (health, readiness, metrics: none takes a body) any body, declared or
   chunked, is refused with 413 and ``Connection: close`` before routing, and never read.

With tracing on, every ``/admin/`` request runs under a SERVER span (``tracing.serve_traced``:
continues the caller's ``traceparent``, named by its route template, echoes its own
``traceparent``), refusals included.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from contextvars import ContextVar

from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import logs, metrics, problems, tracing
from bastion.control.principals import STATE_KEY, client_cn, resolve
from bastion.errors import BastionError, PayloadTooLarge

ADMIN_PREFIX = "/admin/"
NO_BODY = "this route takes no request body (only /admin/ routes do)"

log = logs.get("bastion.control.gate")

UploadRoute = tuple[re.Pattern[str], frozenset[str]]  # a route's path pattern and its methods


class AdminCall:
    """The admin request being served, as the unit of work records it: the method and route
    template (``route``, known once the request was routed) and the SHA-256 of the body as
    received (``body_sha256``, known once the whole body went through ``receive``; ``drain``
    reads what the route left unread)."""

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self._receive = receive
        self._digest = hashlib.sha256()
        self._complete = False
        self._disconnected = False

    def feed(self, chunk: bytes, *, last: bool) -> None:
        self._digest.update(chunk)
        self._complete = self._complete or last

    async def receive(self) -> Message:
        """The route's ``receive``: each body chunk is digested on its way through."""
        message = await self._receive()
        if message["type"] == "http.request" and not self._complete:
            self.feed(message.get("body", b""), last=not message.get("more_body", False))
        elif message["type"] == "http.disconnect":
            self._disconnected = True
        return message

    async def drain(self) -> None:
        """Read (and digest) whatever of the body the route did not read; the gate bounds it."""
        while not self._complete and not self._disconnected:
            await self.receive()

    @property
    def route(self) -> str | None:
        """``METHOD /admin/v1/template/{param}``: the route matched, never the values in its path."""
        route = self.scope.get("route")
        template, pattern = getattr(route, "path", None), getattr(route, "path_regex", None)
        if not isinstance(template, str) or pattern is None:
            return None
        # The route's own path may be relative to the router it was included from (prefix
        # ``/admin/v1``): the prefix is the part of the request's path before what it matches.
        path = str(self.scope["path"])
        for cut, char in enumerate(path):
            if char == "/" and pattern.match(path[cut:]):
                return f"{self.scope['method']} {path[:cut]}{template}"
        return f"{self.scope['method']} {template}"

    @property
    def body_sha256(self) -> str | None:
        """The body's SHA-256 (hex; of b"" when it has none), or None when not all of it was received."""
        return self._digest.hexdigest() if self._complete else None


_CALL: ContextVar[AdminCall | None] = ContextVar("bastion_admin_call", default=None)


def current_call() -> AdminCall | None:
    """The admin request this code runs for (inside ``AdminGate``), or None outside one."""
    return _CALL.get()


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return None


class AdminGate:
    """Authenticate every ``/admin/`` request before its body is read; bound every body but an upload's."""

    def __init__(self, app: ASGIApp, *, max_json_bytes: int, uploads: Iterable[UploadRoute] = ()) -> None:
        self.app = app
        self.max_json_bytes = max_json_bytes
        self.uploads = list(uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if tracing.ON and scope["path"].startswith(ADMIN_PREFIX):
            await tracing.serve_traced(self._gate, scope, receive, send)
            return
        await self._gate(scope, receive, send)

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = _header(scope, b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None  # the app-wide body limit, outside, has refused it already
        chunked = length is None and _header(scope, b"transfer-encoding") is not None
        has_body = bool(declared) or chunked
        if not scope["path"].startswith(ADMIN_PREFIX):
            if has_body:  # health, readiness, metrics: no route here reads a body
                await _refuse(PayloadTooLarge(NO_BODY), scope, receive, send, close=True)
                return
            await self.app(scope, receive, send)
            return
        if not await self._authenticated(scope, receive, send, has_body=has_body):
            return
        call = AdminCall(scope, receive)
        if not has_body:
            call.feed(b"", last=True)
        elif not self._is_upload(scope):  # an upload: the app-wide max_upload_bytes bounds it
            limit = self.max_json_bytes
            if declared is not None and declared > limit:
                await _refuse(_too_large(limit, declared), scope, receive, send, close=True)
                return
            if chunked:
                body = await _read_at_most(limit, receive)
                if body is None:
                    await _refuse(_too_large(limit, None), scope, receive, send, close=True)
                    return
                call = AdminCall(scope, _replay(body, receive))
        token = _CALL.set(call)
        try:
            await self.app(scope, call.receive, send)
        finally:
            _CALL.reset(token)

    async def _authenticated(self, scope: Scope, receive: Receive, send: Send, *, has_body: bool) -> bool:
        """Leave the caller in ``scope["state"]``; or answer why not (and return False)."""
        try:
            caller = await run_in_threadpool(
                resolve, scope["app"].state.control, _header(scope, b"authorization"), client_cn(scope)
            )
        except BastionError as exc:  # 401, 403, or 503 when SQL is away: its own problem
            await _refuse(exc, scope, receive, send, close=has_body)
            return False
        except Exception as exc:  # outside the problem handlers: answered here, logged once
            metrics.ERRORS.labels("http", "unexpected").inc()
            log.error("admin_gate_failed", path=scope["path"], error_type=type(exc).__name__, exc_info=exc)
            response = problems.problem(500, "Internal error", "an unexpected error occurred; it has been logged")
            if has_body:
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return False
        scope.setdefault("state", {})[STATE_KEY] = caller
        return True

    def _is_upload(self, scope: Scope) -> bool:
        return any(scope["method"] in methods and pattern.match(scope["path"]) for pattern, methods in self.uploads)


def _too_large(limit: int, declared: int | None) -> PayloadTooLarge:
    size = f"the body is {declared} bytes" if declared is not None else "the body exceeds the limit"
    return PayloadTooLarge(
        f"{size}; an admin request's JSON body takes at most {limit} bytes (max_admin_body_bytes; "
        "artifact uploads: max_upload_bytes)"
    )


async def _read_at_most(limit: int, receive: Receive) -> bytes | None:
    """A chunked body read whole, or None as soon as it passes ``limit`` bytes."""
    body: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect  # counted and logged as such by RequestMetrics
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        body.append(chunk)
        if not message.get("more_body", False):
            return b"".join(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` (already read) as one message, then defers to ``receive``."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(exc: BastionError, scope: Scope, receive: Receive, send: Send, *, close: bool) -> None:
    """Answer ``exc`` as its problem; with ``close``, ask the server to close the connection
    rather than read (and discard) the rest of a body nobody will read."""
    metrics.ERRORS.labels("http", type(exc).__name__).inc()
    response = problems.from_error(exc, scope["path"])
    if close:
        response.headers["connection"] = "close"
    await response(scope, receive, send)
