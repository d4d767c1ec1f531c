"""OpenTelemetry tracing for every Bastion process: set-up from the standard ``OTEL_*`` environment,
W3C trace context in and out, and spans cheap enough for the request path.

Off unless the environment turns it on (``OTEL_TRACES_EXPORTER=otlp``, or an OTLP endpoint set;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off). While it is off, ``ON``
is False and that boolean is all the request path looks at: no span, no context object, no call.

Spans are OpenTelemetry's data model (trace and span ids, parent, kind, attributes, events,
links, status), sampled by the standard ``OTEL_TRACES_SAMPLER`` samplers, described by the SDK's
``Resource`` (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) and sent as OTLP/HTTP protobuf
(``bastion.otlp``). They are recorded here rather than by the SDK's ``Tracer``: on the 2-core
development machine an SDK span with three events cost ~60 us to record and ~40 us to encode,
against a gateway that spends ~270 us of CPU per request; a span here costs a few
microseconds to record and ~11 us to write into opentelemetry-proto's messages as it ends
(serialised on the exporter's thread).

Propagation is W3C ``traceparent`` only (``tracestate`` is not carried): the gateway continues a
valid header or starts a trace, and hands its own span's ``traceparent`` on in the job envelope
(``tp``); the worker's job span continues it and writes its own into the decision-log event, which
the control plane's consumer continues.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import logs

log = logs.get("bastion.tracing")

ON = False  # whether this process records spans (``configure``)

# OTLP span kinds
INTERNAL = 1
SERVER = 2
CLIENT = 3
PRODUCER = 4
CONSUMER = 5
# OTLP status codes
STATUS_UNSET = 0
STATUS_OK = 1
STATUS_ERROR = 2

MAX_LINKS = 128  # as the SDK's default span limit
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\s]*)?")

Parent = tuple[int, int, bool]  # trace id, span id, sampled: a span's context, as a parent or a link
Value = str | int | float | bool


class Span:
    """One operation: started by ``start``, finished by ``end`` (then queued for export when sampled).

    An unsampled span still has ids (its ``traceparent`` goes on, with the sampled flag off), but
    records nothing.
    """

    __slots__ = (
        "_traceparent",
        "attributes",
        "end_ns",
        "events",
        "kind",
        "links",
        "message",
        "name",
        "parent_id",
        "remote",
        "sampled",
        "span_id",
        "start_ns",
        "status",
        "trace_id",
    )

    def __init__(
        self,
        name: str,
        trace_id: int,
        span_id: int,
        parent_id: int,
        sampled: bool,
        kind: int,
        start_ns: int,
        attributes: dict[str, Value],
        links: Sequence[Parent],
        remote: bool = False,
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes = attributes
        self.events: list[tuple[str, int, dict[str, Value] | None]] = []
        self.links = links
        self.status = STATUS_UNSET
        self.message = ""
        self.remote = remote  # the parent came from another process
        self._traceparent = ""

    @property
    def context(self) -> Parent:
        return (self.trace_id, self.span_id, self.sampled)

    @property
    def traceparent(self) -> str:
        found = self._traceparent
        if not found:
            found = self._traceparent = f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"
        return found

    @property
    def trace_hex(self) -> str:
        return self.traceparent[3:35]

    def event(self, name: str, attributes: dict[str, Value] | None = None, at_ns: int = 0) -> None:
        if self.sampled:
            self.events.append((name, at_ns or time.time_ns(), attributes))

    def fail(self, message: str) -> None:
        """Mark the span failed (status ERROR) with a short description (never a payload)."""
        self.status = STATUS_ERROR
        self.message = message[:200]

    def end(self, end_ns: int = 0) -> None:
        if self.end_ns:
            return
        self.end_ns = end_ns or time.time_ns()
        if self.sampled and _exporter is not None:
            _exporter.add(self)


# sampling (the standard OTEL_TRACES_SAMPLER names) -----------------------------------------
class Sampler:
    """``parent_based``: a span with a parent follows the parent's sampled flag; a root (or any
    span, when not parent based) is sampled when its trace id's low 64 bits fall under ``ratio``
    (as the SDK's ``TraceIdRatioBased``: the same traces sampled in every process)."""

    def __init__(self, ratio: float = 1.0, parent_based: bool = True) -> None:
        self.ratio = min(1.0, max(0.0, ratio))
        self.parent_based = parent_based
        self._bound = round(self.ratio * (1 << 64))

    def sampled(self, trace_id: int, parent_sampled: bool | None) -> bool:
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        return (trace_id & 0xFFFFFFFFFFFFFFFF) < self._bound

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Sampler:
        name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
        arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        parent_based = name.startswith("parentbased_")
        inner = name.removeprefix("parentbased_")
        if inner == "always_on":
            return cls(1.0, parent_based)
        if inner == "always_off":
            return cls(0.0, parent_based)
        if inner == "traceidratio":
            try:
                ratio = float(arg) if arg else 1.0
            except ValueError:
                log.warning("tracing_sampler_arg_invalid", sampler=name)
                ratio = 1.0
            return cls(ratio, parent_based)
        log.warning("tracing_sampler_unsupported", sampler=name, using="parentbased_always_on")
        return cls(1.0, True)


_sampler = Sampler()
_exporter: Any = None  # a bastion.otlp.Exporter while ON
_current: ContextVar[Span | None] = ContextVar("bastion_span", default=None)


# spans ----------------------------------------------------------------------------------
def parse(traceparent: str) -> Parent | None:
    """A W3C ``traceparent`` header's (trace id, parent span id, sampled); None when invalid
    (version ``ff``, a zero id, upper-case hex, extra fields on version 00)."""
    if not traceparent or len(traceparent) < 55:
        return None
    found = _TRACEPARENT.fullmatch(traceparent.strip())
    if found is None:
        return None
    version, trace_hex, span_hex, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def start(
    name: str,
    parent: Parent | None = None,
    *,
    kind: int = INTERNAL,
    attributes: dict[str, Value] | None = None,
    links: Sequence[Parent] = (),
    start_ns: int = 0,
    remote: bool = False,
) -> Span:
    """A new span: a child of ``parent`` (same trace), or the root of a new trace."""
    if parent is None:
        trace_id = _bits(128) or 1  # ids, not secrets (as the SDK's)
        parent_id, sampled = 0, _sampler.sampled(trace_id, None)
    else:
        trace_id, parent_id, parent_sampled = parent
        sampled = _sampler.sampled(trace_id, parent_sampled)
    return Span(
        name,
        trace_id,
        _bits(64) or 1,
        parent_id,
        sampled,
        kind,
        start_ns or time.time_ns(),
        attributes if attributes is not None else {},
        links if len(links) <= MAX_LINKS else links[:MAX_LINKS],
        remote,
    )


_bits = random.getrandbits


def continued(traceparent: str, name: str, **options: Any) -> Span:
    """A span continuing the trace of ``traceparent`` (from another process), or a new trace's
    root when it is missing or invalid."""
    parent = parse(traceparent)
    return start(name, parent, remote=parent is not None, **options)


def current() -> Span | None:
    """The request's server span (set by ``serve_traced`` and the gRPC service), if any."""
    return _current.get()


def enter(span: Span) -> Any:
    """Make ``span`` the current one and put its trace id on the request's log lines; returns
    the token ``leave`` takes."""
    logs.bind(trace_id=span.trace_hex)
    return _current.set(span)


def leave(token: Any) -> None:
    _current.reset(token)


# HTTP ---------------------------------------------------------------------------------
def _header(scope: Scope, wanted: bytes) -> str:
    for name, value in scope["headers"]:
        if name == wanted:
            return str(value.decode("latin-1"))
    return ""


def route_of(scope: Scope) -> str:
    """The matched route's template (``/v1/models/{name}/predict``), never the values in the path;
    '' when nothing matched."""
    route = scope.get("route")
    template, pattern = getattr(route, "path", None), getattr(route, "path_regex", None)
    if isinstance(template, str) and pattern is not None:
        # An included router's route may be relative to its prefix: the prefix is the part of
        # the request's path before what the route matches.
        path = str(scope["path"])
        for cut, char in enumerate(path):
            if char == "/" and pattern.match(path[cut:]):
                return path[:cut] + template
        return template
    endpoint = scope.get("endpoint")
    if endpoint is None:
        return ""
    found = _templates.get(endpoint)
    if found is None:  # a plain Starlette route (the gateway's fast ones): look it up once
        routes = getattr(scope.get("app"), "routes", ())
        found = next((r.path for r in routes if getattr(r, "endpoint", None) is endpoint), "")
        if len(_templates) < 1024:
            _templates[endpoint] = found
    return found


_templates: dict[Any, str] = {}


async def serve_traced(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
    route: Callable[[Scope], str | None] = route_of,
) -> None:
    """Run an HTTP request under a SERVER span: continues the request's ``traceparent``, names
    itself ``METHOD /route/{template}`` once routed, answers with its own ``traceparent`` header,
    and fails on a 5xx (or an exception)."""
    method = scope["method"]
    span = continued(
        _header(scope, b"traceparent"),
        method,
        kind=SERVER,
        attributes={"http.request.method": method},  # (the path itself may hold ids: the route names it)
    )
    header = (b"traceparent", span.traceparent.encode())
    status = 0

    async def send_traced(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            message["headers"] = [*message.get("headers", []), header]
        await send(message)

    token = enter(span)
    try:
        await app(scope, receive, send_traced)
    except BaseException as exc:
        span.fail(type(exc).__name__)
        raise
    finally:
        leave(token)
        template = route(scope)
        if template:
            span.name = f"{method} {template}"
            span.attributes["http.route"] = template
        if status:
            span.attributes["http.response.status_code"] = status
            if status >= 500:
                span.fail(f"HTTP {status}")
        span.end()


UNTRACED = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})  # probes


class TraceRequests:
    """Pure ASGI: every HTTP request under a SERVER span (``serve_traced``), health probes
    (``UNTRACED``) aside; installed only when tracing is on, inside ``RequestId`` so the trace id
    joins the request's log lines."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED:
            await self.app(scope, receive, send)
            return
        await serve_traced(self.app, scope, receive, send)


# set-up -------------------------------------------------------------------------------
def enabled(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or,
    unset, an OTLP endpoint is given), and ``OTEL_SDK_DISABLED`` is not true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    named = [e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if not named:
        return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if "none" in named:
        return False
    for other in set(named) - {"otlp"}:
        log.warning("tracing_exporter_unsupported", exporter=other, supported="otlp")
    return "otlp" in named


def configure(process: str, environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on for this process when the environment asks for it (``enabled``); call it
    once per process, after any fork. Returns whether it is on."""
    global ON, _exporter, _sampler
    env = os.environ if environ is None else environ
    if ON or not enabled(env):
        return ON
    from bastion import otlp  # only when on: nothing of the exporter is imported otherwise

    config = otlp.Config.from_env(env)
    if config is None:
        return False
    _sampler = Sampler.from_env(env)
    _exporter = otlp.Exporter(config, otlp.resource(process))
    _exporter.start()
    ON = True
    atexit.register(shutdown)
    log.info("tracing_on", endpoint=config.endpoint, sampler=env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is queued (within ``timeout_s``) and stop; tracing is off afterwards."""
    global ON, _exporter
    exporter, _exporter = _exporter, None
    ON = False
    if exporter is not None:
        exporter.shutdown(timeout_s)


def flush(timeout_s: float = 5.0) -> bool:
    """Export what is queued now; whether all of it went within ``timeout_s``."""
    return _exporter.flush(timeout_s) if _exporter is not None else True
