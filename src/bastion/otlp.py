"""OTLP/HTTP export of ``bastion.tracing``'s spans: batched on a thread, written as protobuf
``ExportTraceServiceRequest`` (opentelemetry-proto's generated messages, serialised by protobuf),
POSTed to the collector.

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
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from bastion import __version__, logs, metrics
from bastion.tracing import Span, Value

log = logs.get("bastion.otlp")

DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
RETRYABLE = frozenset({429, 502, 503, 504})
_WARN_EVERY_S = 60.0


# the messages (opentelemetry.proto.trace.v1) -------------------------------------------------
def _attributes(add: Any, attributes: Mapping[str, Value]) -> None:
    """``attributes`` as ``KeyValue`` members, made by ``add`` (a repeated field's ``add``): filled
    in place, the cheapest way to build protobuf's messages from Python (about 0.6 us a pair)."""
    for key, value in attributes.items():
        any_value = add(key=key).value
        if isinstance(value, bool):
            any_value.bool_value = value
        elif isinstance(value, int):
            any_value.int_value = value
        elif isinstance(value, float):
            any_value.double_value = value
        else:
            any_value.string_value = str(value)


def fill_span(message: Any, span: Span) -> None:
    """Fill ``message`` (an empty ``Span``, best one made by ``ScopeSpans.spans.add``: built in
    place, never copied) with ``span``."""
    message.trace_id = span.trace_id.to_bytes(16, "big")
    message.span_id = span.span_id.to_bytes(8, "big")
    if span.parent_id:
        message.parent_span_id = span.parent_id.to_bytes(8, "big")
    message.name = span.name
    message.kind = span.kind  # bastion.tracing's kinds and status codes are OTLP's numbers
    message.start_time_unix_nano = span.start_ns
    message.end_time_unix_nano = span.end_ns
    if span.attributes:
        _attributes(message.attributes.add, span.attributes)
    if span.events:
        add_event = message.events.add
        for event_name, at_ns, attributes in span.events:
            event = add_event(time_unix_nano=at_ns, name=event_name)
            if attributes:
                _attributes(event.attributes.add, attributes)
    if span.links:
        add_link = message.links.add
        for trace_id, span_id, sampled in span.links:
            add_link(trace_id=trace_id.to_bytes(16, "big"), span_id=span_id.to_bytes(8, "big"), flags=int(sampled))
    if span.status:
        message.status.code = span.status
        if span.message:
            message.status.message = span.message
    # flags: the sampled bit; whether the parent is known to be remote (HAS_IS_REMOTE, IS_REMOTE)
    message.flags = (1 if span.sampled else 0) | ((0x300 if span.remote else 0x100) if span.parent_id else 0)


def new_request(resource: Resource) -> tuple[ExportTraceServiceRequest, Any]:
    """An empty ``ExportTraceServiceRequest`` for ``resource``'s spans, and its ``spans`` field
    (the one ``ScopeSpans``: scope ``bastion``)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(resource)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.CopyFrom(InstrumentationScope(name="bastion", version=__version__))
    return request, scope_spans.spans


def encode_request(resource: Resource, spans: list[Span]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans``, all of ``resource``, serialised."""
    request, members = new_request(resource)
    for span in spans:
        fill_span(members.add(), span)
    return bytes(request.SerializeToString())


def resource(process: str) -> Resource:
    """This process's ``Resource`` message: the SDK's (``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_SERVICE_NAME``, telemetry.sdk.*, read from ``os.environ``) with ``bastion-<process>``
    as the service name unless the environment names one, ``bastion.process`` and ``process.pid``."""
    from opentelemetry.sdk.resources import SERVICE_NAME
    from opentelemetry.sdk.resources import Resource as SdkResource

    attributes = dict(SdkResource.create({"bastion.process": process, "process.pid": os.getpid()}).attributes)
    if str(attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        attributes[SERVICE_NAME] = f"bastion-{process}"
    found = Resource()
    _attributes(found.attributes.add, {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)})
    return found


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
    every ``delay_s`` or as soon as a batch is full. A span is written into its batch's
    ``ExportTraceServiceRequest`` as it ends (built in place, never copied; serialised on the
    thread): the queue holds one protobuf message per batch rather than the spans' Python objects,
    which would otherwise live for seconds and be promoted through the garbage collector's
    generations. A span that cannot be encoded (a string that is not UTF-8, an integer beyond 64
    bits) is dropped and counted."""

    def __init__(self, config: Config, resource: Resource) -> None:
        self.config = config
        self.resource = resource
        self._batches: deque[tuple[ExportTraceServiceRequest, Any]] = deque()  # (request, its spans)
        self._open: Any = None  # the spans of the last batch, while it has room
        self._queued = 0
        self._lock = threading.Lock()
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
        if self._queued >= self.config.max_queue:
            self._dropped.inc()
            return
        with self._lock:
            spans = self._open
            if spans is None:
                batch = new_request(self.resource)
                self._batches.append(batch)
                spans = self._open = batch[1]
            try:
                fill_span(spans.add(), span)
            except Exception:  # a span that cannot be encoded is dropped, never the request's failure
                del spans[-1]
                self._dropped.inc()
                return
            self._queued += 1
            if len(spans) >= self.config.max_batch:
                self._open = None
                self._wake.set()

    def _take(self) -> tuple[ExportTraceServiceRequest, int] | None:
        """The oldest batch (closed: no span goes into it afterwards), and its number of spans."""
        with self._lock:
            if not self._batches:
                return None
            request, spans = self._batches.popleft()
            if spans is self._open:
                self._open = None
            self._queued -= len(spans)
            return request, len(spans)

    def flush(self, timeout_s: float) -> bool:
        """Wake the thread and wait until the queue is empty (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        while self._queued and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            self._idle.clear()
            self._wake.set()
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return not self._queued

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
            while (taken := self._take()) is not None:
                request, count = taken
                try:
                    sent = self._send(request.SerializeToString())
                except Exception as exc:  # never let the exporter's thread die
                    self._warn("trace_export_failed", error_type=type(exc).__name__)
                    sent = False
                (self._exported if sent else self._dropped).inc(count)
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
