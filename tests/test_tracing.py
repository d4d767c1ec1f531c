"""Tracing: one trace per request across the gateway, worker and control-plane processes.

A real OTLP/HTTP receiver runs in the test process on 127.0.0.1 and decodes every export as
opentelemetry-proto's ``ExportTraceServiceRequest``; a real stack (Redis, control plane, worker,
gateway: separate processes) exports to it because the standard ``OTEL_*`` variables say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import httpx
import pytest
import structlog
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bastion import demo, logs, metrics, middleware, otlp, tracing
from bastion.embedded.redis_server import free_port
from tests.support import Stack, wait_until

BODY = {"inputs": [[0.0] * 30]}
PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"


@dataclass
class Received:
    """One span as the receiver decoded it, with the resource that sent it."""

    process: str
    pid: int
    service: str
    span: PbSpan

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {
            kv.key: getattr(kv.value, kv.value.WhichOneof("value") or "string_value") for kv in self.span.attributes
        }

    @property
    def events(self) -> list[str]:
        return [e.name for e in self.span.events]

    @property
    def links(self) -> list[tuple[str, str]]:
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]


class Receiver:
    """An OTLP/HTTP traces endpoint (``POST /v1/traces``, protobuf) on 127.0.0.1."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                attrs = {kv.key: kv.value for kv in resource_spans.resource.attributes}
                process = attrs["bastion.process"].string_value if "bastion.process" in attrs else ""
                pid = attrs["process.pid"].int_value if "process.pid" in attrs else 0
                service = attrs["service.name"].string_value if "service.name" in attrs else ""
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.received.append(Received(process, pid, service, span))

    def spans(self, trace_id: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.received if trace_id is None or r.trace_id == trace_id]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _new_ids() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(8)


def _one(spans: list[Received], **wanted: Any) -> Received:
    found = [s for s in spans if all(getattr(s, k) == v or getattr(s.span, k, None) == v for k, v in wanted.items())]
    assert len(found) == 1, f"expected one span with {wanted}, got {[(s.process, s.span.name) for s in spans]}"
    return found[0]


def _decision(stack: Stack, event_id: str) -> dict[str, Any]:
    """The decision-log event of ``event_id``, once the control plane has logged it."""
    url = f"{stack.control_url}/admin/v1/audit/events/{event_id}"
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    wait_until(lambda: httpx.get(url, headers=headers).status_code == 200, 20, f"decision {event_id}")
    found: dict[str, Any] = httpx.get(url, headers=headers).json()["event"]
    return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("tracing"), grpc_port=free_port())
    try:
        with pytest.MonkeyPatch.context() as env:  # the processes inherit these (Stack.start copies os.environ)
            env.setenv("OTEL_TRACES_EXPORTER", "otlp")
            env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
            env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
            env.delenv("OTEL_SDK_DISABLED", raising=False)
            env.delenv("OTEL_SERVICE_NAME", raising=False)
            running.start()
        yield running
    finally:
        running.stop()


# across processes ------------------------------------------------------------------------
def test_one_trace_spans_gateway_worker_and_control_plane_with_parent_links(stack: Stack, receiver: Receiver) -> None:
    trace_id, client_span = _new_ids()
    with stack.client() as client:
        response = client.post(PREDICT, json=BODY, headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert response.status_code == 200, response.text
    prediction = response.json()["id"]
    echoed = tracing.parse(response.headers["traceparent"])
    assert echoed is not None and f"{echoed[0]:032x}" == trace_id and echoed[2] is True
    assert response.headers["x-request-id"]
    gateway_span = f"{echoed[1]:016x}"

    def complete() -> bool:
        return {s.process for s in receiver.spans(trace_id)} >= {"gateway", "worker", "control"}

    wait_until(complete, 30, "spans of the gateway, worker and control plane in the client's trace")
    spans = receiver.spans(trace_id)
    gateway = _one(spans, process="gateway")
    assert gateway.span_id == gateway_span  # the span the response names
    assert gateway.parent_id == client_span  # the client's traceparent, continued
    assert gateway.span.kind == PbSpan.SPAN_KIND_SERVER
    assert gateway.span.name == "POST /v1/models/{name}/predict"
    assert gateway.attributes["bastion.job_id"] == prediction
    assert gateway.attributes["http.response.status_code"] == 200
    assert ["authenticated", "enqueued", "replied"] == [e for e in gateway.events if e != "cache_hit"]

    job = _one(spans, process="worker")
    assert job.parent_id == gateway.span_id
    assert job.span.name == f"job {demo.MODEL_NAME}"
    assert job.attributes["bastion.status"] == "succeeded"

    control = _one(spans, process="control")
    assert control.span.name == "audit append"
    assert control.parent_id == job.span_id  # the decision-log event carried the worker's span

    assert len({gateway.pid, job.pid, control.pid}) == 3  # three processes, one trace
    assert {gateway.service, job.service, control.service} == {"bastion-gateway", "bastion-worker", "bastion-control"}

    # the worker's batch span: its own trace, linked to the request's gateway span; the model
    # call and the reply are its children
    batch_trace, batch_span = job.links[0]
    wait_until(lambda: len(receiver.spans(batch_trace)) >= 3, 10, "the batch's spans")
    batch_spans = receiver.spans(batch_trace)
    batch = _one(batch_spans, span_id=batch_span)
    assert (trace_id, gateway.span_id) in batch.links
    assert batch.span.name == f"batch {demo.MODEL_NAME}"
    children = {s.span.name for s in batch_spans if s.parent_id == batch.span_id}
    assert children == {f"model {demo.MODEL_NAME}", "reply"}

    # the decision-log event names the trace
    assert _decision(stack, prediction)["trace"] == trace_id


def test_a_grpc_call_continues_the_metadata_traceparent(stack: Stack, receiver: Receiver) -> None:
    trace_id, client_span = _new_ids()
    request = service_pb2.ModelInferRequest(model_name=demo.MODEL_NAME)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
    tensor.contents.fp32_contents.extend([0.0] * 30)
    metadata = (("authorization", f"Bearer {stack.keys['acme']}"), ("traceparent", f"00-{trace_id}-{client_span}-01"))
    with grpc.insecure_channel(f"127.0.0.1:{stack.settings.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(request, metadata=metadata, timeout=30)
    trailers = dict(call.trailing_metadata())
    assert trailers["traceparent"].split("-")[1] == trace_id
    wait_until(lambda: {s.process for s in receiver.spans(trace_id)} >= {"gateway", "worker"}, 30, "the call's spans")
    gateway = _one(receiver.spans(trace_id), process="gateway")
    assert gateway.span.name == "inference.GRPCInferenceService/ModelInfer"
    assert gateway.parent_id == client_span and gateway.span_id == trailers["traceparent"].split("-")[2]
    assert gateway.attributes["rpc.grpc.status_code"] == 0
    assert _one(receiver.spans(trace_id), process="worker").parent_id == gateway.span_id


def test_health_probes_are_not_traced(stack: Stack) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/ready"):
        response = httpx.get(f"{stack.gateway}{path}")
        assert response.status_code == 200 and "traceparent" not in response.headers


def test_admin_calls_continue_the_callers_trace(stack: Stack, receiver: Receiver) -> None:
    trace_id, caller_span = _new_ids()
    response = httpx.get(
        f"{stack.control_url}/admin/v1/models",
        headers={"Authorization": f"Bearer {stack.admin_key}", "traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    assert response.status_code == 200
    assert response.headers["traceparent"].split("-")[1] == trace_id
    wait_until(lambda: receiver.spans(trace_id), 10, "the admin call's span")
    admin = _one(receiver.spans(trace_id), process="control")
    assert admin.parent_id == caller_span
    assert admin.span.name == "GET /admin/v1/models"
    assert admin.span.kind == PbSpan.SPAN_KIND_SERVER


def test_a_refused_admin_call_has_its_span_too(stack: Stack, receiver: Receiver) -> None:
    trace_id, caller_span = _new_ids()
    response = httpx.get(
        f"{stack.control_url}/admin/v1/models",
        headers={"Authorization": "Bearer nope", "traceparent": f"00-{trace_id}-{caller_span}-01"},
    )
    assert response.status_code == 401
    wait_until(lambda: receiver.spans(trace_id), 10, "the refused admin call's span")
    assert _one(receiver.spans(trace_id), process="control").attributes["http.response.status_code"] == 401


def test_the_gateway_starts_a_trace_when_the_client_sends_none_or_an_invalid_one(
    stack: Stack, receiver: Receiver
) -> None:
    for header in ({}, {"traceparent": f"00-{'0' * 32}-{'1' * 16}-01"}, {"traceparent": "garbage"}):
        with stack.client() as client:
            response = client.post(PREDICT, json=BODY, headers=header)
        assert response.status_code == 200
        started = tracing.parse(response.headers["traceparent"])
        assert started is not None
        trace_id = f"{started[0]:032x}"
        wait_until(lambda trace_id=trace_id: len(receiver.spans(trace_id)) >= 3, 30, "the new trace's spans")
        gateway = _one(receiver.spans(trace_id), process="gateway")
        assert gateway.parent_id == ""  # a root
        assert _decision(stack, response.json()["id"])["trace"] == trace_id


def test_an_unsampled_client_trace_is_continued_but_not_recorded(stack: Stack, receiver: Receiver) -> None:
    trace_id, client_span = _new_ids()
    with stack.client() as client:
        response = client.post(PREDICT, json=BODY, headers={"traceparent": f"00-{trace_id}-{client_span}-00"})
    assert response.status_code == 200
    assert (
        response.headers["traceparent"].startswith(f"00-{trace_id}-") and response.headers["traceparent"][-2:] == "00"
    )
    # a later, sampled request's spans arrive; none of the unsampled one's ever do
    marker, _ = _new_ids()
    with stack.client() as client:
        client.post(PREDICT, json=BODY, headers={"traceparent": f"00-{marker}-{'2' * 16}-01"})
    wait_until(lambda: {s.process for s in receiver.spans(marker)} >= {"gateway", "worker", "control"}, 30, "marker")
    assert receiver.spans(trace_id) == []


def test_an_error_response_names_its_trace_too(stack: Stack, receiver: Receiver) -> None:
    trace_id, client_span = _new_ids()
    with stack.client() as client:
        response = client.post(
            "/v1/models/breast-cancer/predict",
            content=b"{not json",
            headers={"traceparent": f"00-{trace_id}-{client_span}-01", "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert response.headers["traceparent"].split("-")[1] == trace_id
    wait_until(lambda: receiver.spans(trace_id), 10, "the refused request's span")
    gateway = _one(receiver.spans(trace_id), process="gateway")
    assert gateway.attributes["http.response.status_code"] == 400
    assert gateway.events == ["authenticated"]  # refused before anything was queued


# in this process -------------------------------------------------------------------------
@pytest.fixture
def traced(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tracing on in this process, exporting to the receiver."""
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    assert tracing.configure("test", env)
    try:
        yield
    finally:
        tracing.shutdown()


def test_log_lines_of_a_traced_request_name_its_trace(traced: None, receiver: Receiver) -> None:
    async def endpoint(request: Request) -> PlainTextResponse:
        logs.get("test").warning("inside_the_request")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/thing/{id}", endpoint)])
    app.add_middleware(tracing.TraceRequests)
    app.add_middleware(middleware.RequestId)  # outside the tracing, as the gateway has them
    trace_id, client_span = _new_ids()

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            return await http.get("/thing/7", headers={"traceparent": f"00-{trace_id}-{client_span}-01"})

    out = io.StringIO()
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        with contextlib.redirect_stderr(out):  # configure binds the stream it finds
            logs.configure("info", "test")
        response = asyncio.run(go())
    finally:
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()
        root.handlers[:], root.level = before[0], before[1]
    assert response.headers["traceparent"].split("-")[1] == trace_id
    lines = [json.loads(line) for line in out.getvalue().splitlines() if "inside_the_request" in line]
    assert len(lines) == 1 and lines[0]["trace_id"] == trace_id
    assert lines[0]["request_id"] == response.headers["x-request-id"]
    assert tracing.flush(5)
    wait_until(lambda: receiver.spans(trace_id), 10, "the in-process span")
    span = _one(receiver.spans(trace_id), process="test")
    assert span.span.name == "GET /thing/{id}"
    assert span.attributes["http.route"] == "/thing/{id}"
    assert span.parent_id == client_span
    assert span.service == "bastion-test"


def test_the_exporter_sends_full_batches_and_drops_a_span_it_cannot_encode(receiver: Receiver) -> None:
    config = otlp.Config(endpoint=f"{receiver.url}/v1/traces", delay_s=0.05, max_batch=2)
    exporter = otlp.Exporter(config, otlp.resource("batches"))
    dropped = metrics.TRACE_SPANS.labels("dropped")
    before, requests = dropped._value.get(), receiver.requests
    trace_id = int(secrets.token_hex(16), 16)
    for i, name in enumerate(["a", "b", "\udcff", "c", "d"]):  # a lone surrogate: not UTF-8
        span = tracing.Span(name, trace_id, i + 1, 0, True, tracing.INTERNAL, 1, {"i": i}, [])
        span.end_ns = 2
        exporter.add(span)
    assert dropped._value.get() == before + 1
    exporter.start()
    try:
        assert exporter.flush(5)
    finally:
        exporter.shutdown(5)
    spans = receiver.spans(f"{trace_id:032x}")
    assert sorted(s.span.name for s in spans) == ["a", "b", "c", "d"]
    assert {s.process for s in spans} == {"batches"}
    assert receiver.requests - requests == 2  # max_batch spans a request


def test_spans_are_encoded_as_opentelemetry_proto_decodes_them() -> None:
    span = tracing.Span(
        "s", 5, 7, 9, True, tracing.CONSUMER, 10, {"a": "x", "b": -3, "c": 1.5, "d": True}, [(1, 2, True)]
    )
    span.event("e", {"k": "v"}, at_ns=11)
    span.fail("bad")
    span.end_ns = 12
    request = ExportTraceServiceRequest.FromString(otlp.encode_request(otlp.resource("test"), [span]))
    (decoded,) = request.resource_spans[0].scope_spans[0].spans
    assert decoded.trace_id == (5).to_bytes(16, "big") and decoded.span_id == (7).to_bytes(8, "big")
    assert decoded.parent_span_id == (9).to_bytes(8, "big")
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (10, 12)
    assert decoded.kind == PbSpan.SPAN_KIND_CONSUMER
    values = {kv.key: kv.value for kv in decoded.attributes}
    assert values["a"].string_value == "x" and values["b"].int_value == -3
    assert values["c"].double_value == 1.5 and values["d"].bool_value is True
    assert decoded.events[0].name == "e" and decoded.events[0].time_unix_nano == 11
    assert decoded.events[0].attributes[0].value.string_value == "v"
    assert decoded.links[0].trace_id == (1).to_bytes(16, "big") and decoded.links[0].flags == 1
    assert decoded.status.code == decoded.status.STATUS_CODE_ERROR and decoded.status.message == "bad"


def test_attributes_keep_their_own_type_and_place() -> None:
    """True and 1 (equal in Python) encode as a bool and an int; a span's and an event's stay apart."""
    first = tracing.Span("a", 1, 2, 0, True, tracing.INTERNAL, 1, {"x": True, "y": "v"}, [])
    first.event("e", {"y": "v", "x": 1}, at_ns=2)
    first.end_ns = 3
    second = tracing.Span("b", 1, 3, 0, True, tracing.INTERNAL, 1, {"x": 1, "y": "v"}, [])
    second.end_ns = 3
    request = ExportTraceServiceRequest.FromString(otlp.encode_request(otlp.resource("test"), [first, second, first]))
    decoded = request.resource_spans[0].scope_spans[0].spans
    for span in (decoded[0], decoded[2]):
        assert [(kv.key, kv.value.WhichOneof("value")) for kv in span.attributes] == [
            ("x", "bool_value"),
            ("y", "string_value"),
        ]
        assert [(kv.key, kv.value.WhichOneof("value")) for kv in span.events[0].attributes] == [
            ("y", "string_value"),
            ("x", "int_value"),
        ]
    assert decoded[1].attributes[0].value.int_value == 1


# set-up and propagation ------------------------------------------------------------------
def test_tracing_is_off_unless_the_environment_asks_for_it() -> None:
    assert not tracing.enabled({})
    assert tracing.enabled({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert not tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.enabled({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.ON  # nothing configured it in this process


def test_the_exporter_reads_the_standard_otlp_variables() -> None:
    config = otlp.Config.from_env(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector:4318/",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b,x=1",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_BSP_SCHEDULE_DELAY": "250",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100",
        }
    )
    assert config is not None
    assert config.endpoint == "https://collector:4318/v1/traces"
    assert config.headers == {"api-key": "a b", "x": "1"}
    assert (config.timeout_s, config.gzip, config.delay_s, config.max_batch) == (2.5, True, 0.25, 100)
    traces = otlp.Config.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/custom"})
    assert traces is not None and traces.endpoint == "http://c:1/custom"
    assert otlp.Config.from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"00-{'a' * 32}-{'b' * 16}-01", (int("a" * 32, 16), int("b" * 16, 16), True)),
        (f"00-{'a' * 32}-{'b' * 16}-00", (int("a" * 32, 16), int("b" * 16, 16), False)),
        (f"01-{'a' * 32}-{'b' * 16}-03-future", (int("a" * 32, 16), int("b" * 16, 16), True)),
        (f"00-{'a' * 32}-{'b' * 16}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{'a' * 32}-{'b' * 16}-01", None),
        (f"00-{'0' * 32}-{'b' * 16}-01", None),
        (f"00-{'a' * 32}-{'0' * 16}-01", None),
        (f"00-{'A' * 32}-{'b' * 16}-01", None),  # upper case is invalid
        ("", None),
        ("00-abc", None),
    ],
)
def test_traceparent_headers_are_read_as_w3c_trace_context_says(header: str, expected: Any) -> None:
    assert tracing.parse(header) == expected


def test_samplers_follow_the_standard_names() -> None:
    trace_low = 1 << 62  # a trace id whose low 64 bits are a quarter of the range
    half = tracing.Sampler.from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    assert half.sampled(trace_low, None) and half.sampled(trace_low, False)  # not parent based
    assert not half.sampled(3 << 62, None)
    based = tracing.Sampler.from_env(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    )
    assert based.sampled(trace_low, True) and not based.sampled(trace_low, None)
    assert not tracing.Sampler.from_env({"OTEL_TRACES_SAMPLER": "always_off"}).sampled(trace_low, True)
    assert tracing.Sampler.from_env({}).sampled(trace_low, None)  # parentbased_always_on
