"""OTLP/HTTP export of ``bastion.tracing``'s spans: batched on a thread, written as protobuf
``ExportTraceServiceRequest`` (opentelemetry-proto's messages, encoded here field by field: only
what spans use), POSTed to the collector.

Configured by the standard variables, as the SDK's exporter and batch processor read them:

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the whole URL), else ``OTEL_EXPORTER_OTLP_ENDPOINT`` +
  ``/v1/traces``, else ``http://localhost:4318/v1/traces``;
- ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`` (``k=v,k2=v2``, URL-encoded), ``..._TIMEOUT`` (ms,
  10000), ``..._COMPRESSION`` (``gzip`` or ``none``), ``..._CERTIFICATE`` (CA file),
  ``..._CLIENT_CERTIFICATE`` / ``..._CLIENT_KEY`` (mTLS); ``..._PROTOCOL`` must be
  ``http/protobuf`` (gRPC export is not built in);
- ``OTEL_BSP_SCHEDULE_DELAY`` (ms, 5000), ``OTEL_BSP_MAX_QUEUE_SIZE`` (2048),
  ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` (512), ``OTEL_BSP_EXPORT_TIMEOUT`` (ms, 30000).

Spans beyond the queue's bound are dropped and counted (``bastion_trace_spans_total{result}``),
never waited for; a collector that fails is retried (429, 502, 503, 504, connection errors) with a
growing wait within the export timeout, then the batch is dropped and counted.
"""

from __future__ import annotations

import gzip
import http.client
import os
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from bastion import __version__, logs, metrics
from bastion.tracing import Span, Value

log = logs.get("bastion.otlp")

DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
RETRYABLE = frozenset({429, 502, 503, 504})
_WARN_EVERY_S = 60.0

_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack


# protobuf, by hand ------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [_varint(i) for i in range(4096)]


def _len(n: int) -> bytes:
    return _SMALL[n] if n < 4096 else _varint(n)


def _field(tag: bytes, body: bytes) -> bytes:
    return tag + _len(len(body)) + body


# repeated attributes (method, route, model, ...): (tag, key, type, value) -> the member's bytes
# (the type too: True == 1 == 1.0 as dict keys, but they encode differently)
_encoded: dict[tuple[bytes, str, type, Value], bytes] = {}
_UNIQUE = frozenset({"bastion.job_id"})  # values that seldom repeat: never cached


def _attribute(key: str, value: Value) -> bytes:
    """A ``KeyValue`` message."""
    if isinstance(value, bool):
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif isinstance(value, int):
        any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        any_value = b"\x21" + _double(value)
    else:
        any_value = _field(b"\x0a", str(value).encode(errors="replace"))
    return _field(b"\x0a", key.encode()) + _field(b"\x12", any_value)


def _attributes(tag: bytes, attributes: Mapping[str, Value]) -> bytes:
    """``attributes`` as repeated ``KeyValue`` members under ``tag``; the encodings of pairs met
    before come from a bounded cache (most pairs repeat: method, route, model, status)."""
    parts = []
    cache = _encoded
    for key, value in attributes.items():
        cached = (tag, key, type(value), value)
        found = cache.get(cached)
        if found is None:
            found = _field(tag, _attribute(key, value))
            if len(cache) < 8192 and key not in _UNIQUE:
                cache[cached] = found
        parts.append(found)
    return b"".join(parts)


_EVENT_TAGS: dict[str, bytes] = {}


def encode_span(span: Span) -> bytes:
    """One ``Span`` message (opentelemetry.proto.trace.v1)."""
    name = span.name.encode(errors="replace")
    parts = [
        b"\x0a\x10",
        span.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span.span_id.to_bytes(8, "big"),
        b"\x22\x08" + span.parent_id.to_bytes(8, "big") if span.parent_id else b"",
        b"\x2a",
        _len(len(name)),
        name,
        _KINDS[span.kind],
        _fixed64(span.start_ns),
        b"\x41",
        _fixed64(span.end_ns),
    ]
    if span.attributes:
        parts.append(_attributes(b"\x4a", span.attributes))
    for event_name, at_ns, attributes in span.events:
        named = _EVENT_TAGS.get(event_name)
        if named is None:
            named = _field(b"\x12", event_name.encode())
            if len(_EVENT_TAGS) < 256:
                _EVENT_TAGS[event_name] = named
        event = b"\x09" + _fixed64(at_ns) + named
        if attributes:
            event += _attributes(b"\x1a", attributes)
        parts += [b"\x5a", _len(len(event)), event]
    for trace_id, span_id, sampled in span.links:
        parts.append(_LINK + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big"))
        parts.append(_SAMPLED if sampled else _UNSAMPLED)
    if span.status:
        status = b"\x18" + _SMALL[span.status]
        if span.message:
            status = _field(b"\x12", span.message.encode(errors="replace")) + status
        parts.append(_field(b"\x7a", status))
    # flags: the sampled bit; whether the parent is known to be remote (HAS_IS_REMOTE, IS_REMOTE)
    flags = (1 if span.sampled else 0) | ((0x300 if span.remote else 0x100) if span.parent_id else 0)
    parts += [b"\x85\x01", struct.pack("<I", flags)]
    return b"".join(parts)


_KINDS = [b"\x30" + _SMALL[kind] + b"\x39" for kind in range(6)]  # kind, then the start time's tag
_LINK = b"\x6a\x21\x0a\x10"  # a Link of 33 bytes: trace id (18), span id (10), flags (5)
_SAMPLED = b"\x35" + struct.pack("<I", 1)
_UNSAMPLED = b"\x35" + struct.pack("<I", 0)


def span_member(span: Span) -> bytes:
    """``span`` as a member of ``ScopeSpans.spans`` (what the exporter queues)."""
    return _field(b"\x12", encode_span(span))


def encode_request(resource: bytes, spans: list[Span]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans``, all of one resource (already encoded)."""
    return encode_members(resource, [span_member(s) for s in spans])


def encode_members(resource: bytes, members: list[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of spans already encoded by ``span_member``."""
    scope = _field(b"\x0a", _field(b"\x0a", b"bastion") + _field(b"\x12", __version__.encode()))
    resource_spans = _field(b"\x0a", resource) + _field(b"\x12", scope + b"".join(members))
    return _field(b"\x0a", resource_spans)


def resource(process: str) -> bytes:
    """This process's ``Resource`` message: the SDK's (``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_SERVICE_NAME``, telemetry.sdk.*, read from ``os.environ``) with ``bastion-<process>``
    as the service name unless the environment names one, ``bastion.process`` and ``process.pid``."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes = dict(Resource.create({"bastion.process": process, "process.pid": os.getpid()}).attributes)
    if str(attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attributes[SERVICE_NAME] = f"bastion-{process}"
    return _attributes(b"\x0a", {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)})


# configuration --------------------------------------------------------------------------
def _env(environ: Mapping[str, str], name: str, default: str = "") -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``, else ``default``."""
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or environ.get(f"OTEL_EXPORTER_OTLP_{name}") or default
    ).strip()


def _number(text: str, name: str, default: float) -> float:
    """A positive number from a setting's text; ``default`` when unset or invalid (warned)."""
    try:
        value = float(text or default)
    except ValueError:
        log.warning("tracing_setting_invalid", setting=name)
        return default
    return value if value > 0 else default


def _ms(environ: Mapping[str, str], name: str, default: float) -> float:
    return _number(environ.get(name, "").strip(), name, default)


@dataclass(frozen=True)
class Config:
    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 10.0
    gzip: bool = False
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""
    delay_s: float = 5.0
    max_queue: int = 2048
    max_batch: int = 512
    export_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config | None:
        """The exporter's settings; None (with a warning) when they cannot be used."""
        protocol = _env(environ, "PROTOCOL", "http/protobuf")
        if protocol != "http/protobuf":
            log.warning("tracing_protocol_unsupported", protocol=protocol, supported="http/protobuf")
            return None
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if not endpoint:
            endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
            endpoint = endpoint.rstrip("/") + TRACES_PATH
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            log.warning("tracing_endpoint_invalid", endpoint=endpoint[:200])
            return None
        headers = {}
        for pair in _env(environ, "HEADERS").split(","):
            name, sep, value = pair.partition("=")
            if sep and name.strip():
                headers[unquote(name.strip())] = unquote(value.strip())
        max_queue = int(_ms(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048))
        return cls(
            endpoint=endpoint,
            headers=headers,
            timeout_s=_number(_env(environ, "TIMEOUT"), "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000) / 1000,
            gzip=_env(environ, "COMPRESSION").lower() == "gzip",
            ca_file=_env(environ, "CERTIFICATE"),
            client_cert=_env(environ, "CLIENT_CERTIFICATE"),
            client_key=_env(environ, "CLIENT_KEY"),
            delay_s=_ms(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000,
            max_queue=max_queue,
            max_batch=min(max_queue, int(_ms(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))),
            export_timeout_s=_ms(environ, "OTEL_BSP_EXPORT_TIMEOUT", 30_000) / 1000,
        )


# the exporter ----------------------------------------------------------------------------
class Exporter:
    """A bounded queue of finished spans and the thread that sends them, ``max_batch`` at a time,
    every ``delay_s`` or as soon as a batch is full. A span is encoded as it is queued: the queue
    holds one bytes object per span rather than the span's objects, which would otherwise live
    for seconds and be promoted through the garbage collector's generations."""

    def __init__(self, config: Config, resource: bytes) -> None:
        self.config = config
        self.resource = resource
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._warned = 0.0
        parts = urlsplit(config.endpoint)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port or (443 if self._https else 80)
        self._path = (parts.path or TRACES_PATH) + (f"?{parts.query}" if parts.query else "")
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"bastion/{__version__}",
            **config.headers,
        }
        if config.gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._exported = metrics.TRACE_SPANS.labels("exported")
        self._dropped = metrics.TRACE_SPANS.labels("dropped")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        queue = self._queue
        if len(queue) >= self.config.max_queue:
            self._dropped.inc()
            return
        try:
            queue.append(span_member(span))
        except Exception:  # a span that cannot be encoded is dropped, never the request's failure
            self._dropped.inc()
            return
        if len(queue) == self.config.max_batch:
            self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wake the thread and wait until the queue is empty (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        while self._queue and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            self._idle.clear()
            self._wake.set()
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._queue

    def shutdown(self, timeout_s: float) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.config.delay_s)
            self._wake.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(self.config.max_batch, len(self._queue)))]
                try:
                    sent = self._send(encode_members(self.resource, batch))
                except Exception as exc:  # never let the exporter's thread die
                    self._warn("trace_export_failed", error_type=type(exc).__name__)
                    sent = False
                (self._exported if sent else self._dropped).inc(len(batch))
            self._idle.set()
            if self._stopping:
                return

    def _send(self, body: bytes) -> bool:
        if self.config.gzip:
            body = gzip.compress(body, compresslevel=5)
        deadline = time.monotonic() + self.config.export_timeout_s
        wait = 0.5
        while True:
            status = 0
            try:
                conn = self._connection()
                conn.request("POST", self._path, body=body, headers=self._headers)
                response = conn.getresponse()
                response.read()
                status = response.status
                if 200 <= status < 300:
                    return True
                if status not in RETRYABLE:
                    self._warn("trace_export_refused", status=status)
                    return False
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                self._warn("trace_export_failed", error_type=type(exc).__name__)
            if self._stopping or time.monotonic() + wait > deadline:
                if status:
                    self._warn("trace_export_refused", status=status)
                return False
            time.sleep(wait)
            wait = min(wait * 2, 5.0)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                context = ssl.create_default_context(cafile=self.config.ca_file or None)
                if self.config.client_cert:
                    context.load_cert_chain(self.config.client_cert, self.config.client_key or None)
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self.config.timeout_s, context=context
                )
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.config.timeout_s)
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _warn(self, event: str, **fields: Any) -> None:
        """A warning at most once a minute (a collector away would otherwise log every batch)."""
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            log.warning(event, endpoint=self.config.endpoint[:200], **fields)
