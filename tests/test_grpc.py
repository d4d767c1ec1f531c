"""The Open Inference Protocol over gRPC, spoken by ``tritonclient.grpc`` as published, against a
real ``bastion up --grpc-port N`` (two gateway processes sharing the port, one worker).

Where tritonclient has no call for what is checked (typed ``contents``, a malformed message, the
trailing metadata), the requests go through tritonclient's own generated stubs
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), or a bare ``grpc`` channel.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bastion import demo
from bastion.adminclient import AdminClient
from bastion.embedded.redis_server import free_port
from tests.support import breast_cancer, wait_until
from tests.test_up import Up

MODEL = demo.MODEL_NAME
MAX_MESSAGE = 1 << 20
INFER = "/inference.GRPCInferenceService/ModelInfer"


class Served:
    """``bastion up`` with gRPC on, its admin client and keys."""

    def __init__(self, up: Up, grpc_port: int) -> None:
        self.up = up
        self.target = f"127.0.0.1:{grpc_port}"
        self.control_url = json.loads((up.data_dir / "endpoints.json").read_text())["control_url"]
        self.admin = AdminClient(self.control_url, (up.data_dir / "admin.key").read_text().strip())
        self.key = re.findall(r"bst_[A-Za-z0-9]+_[A-Za-z0-9_-]+", up.out)[0]  # the first key: tenant demo
        self.reader = self.admin.create_key("demo", "reader", scopes=["models:read"])["key"]
        self.gateway_url = f"http://127.0.0.1:{up.gateway_port}"
        for key in (self.key, self.reader):
            known_everywhere(self, key)

    def client(self) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(self.target)

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {key or self.key}"}

    def metadata(self, key: str | None = None, **more: str) -> tuple[tuple[str, str], ...]:
        return (*self.auth(key).items(), *more.items())


def known_everywhere(served: Served, key: str) -> None:
    """Wait until every gateway knows ``key`` (each connection lands on one of them)."""

    def known() -> bool:
        for _ in range(8):
            with served.client() as client:
                try:
                    client.is_model_ready(MODEL, headers=served.auth(key))
                except triton.InferenceServerException:
                    return False
        return True

    wait_until(known, 15, "every gateway to know the new key")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    grpc_port = free_port()
    env = {"BASTION_ABUSE_TARPIT_AFTER": "1000000", "BASTION_ABUSE_BAN_AFTER": "1000000", "BASTION_DRAIN_S": "0"}
    extra = ["--grpc-port", str(grpc_port), "--grpc-max-message-bytes", str(MAX_MESSAGE)]
    extra += ["--gateways", "2", "--workers", "1", "--gateway-metrics-port", str(free_port())]
    up = Up(tmp_path_factory.mktemp("grpc"), free_port(), free_port(), env=env, extra=extra)
    try:
        banner = up.read_banner()
        assert f", gRPC 127.0.0.1:{grpc_port}." in banner, banner
        instance = Served(up, grpc_port)
        yield instance
        instance.admin.close()
    finally:
        up.stop()


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(demo.model_bytes(), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"input": x})
    return label, proba


def rows_input(rows: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)  # raw_input_contents, tritonclient's default
    return tensor


def refused(call: Any) -> triton.InferenceServerException:
    with pytest.raises(triton.InferenceServerException) as caught:
        call()
    return caught.value


def typed_request(rows: np.ndarray, **fields: Any) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, **fields)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.ravel().tolist())
    return request


# health and metadata ----------------------------------------------------------------------
def test_server_and_model_health_and_metadata(served: Served) -> None:
    with served.client() as client:
        assert client.is_server_live() and client.is_server_ready()  # public, as /v2/health/*
        assert client.get_server_metadata().name == "bastion"
        assert client.is_model_ready(MODEL, headers=served.auth())
        assert client.is_model_ready(MODEL, model_version="1", headers=served.auth(served.reader))
        meta = client.get_model_metadata(MODEL, headers=served.auth(), as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "30"]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": ["-1"]},
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "2"]},
    ]


# inference --------------------------------------------------------------------------------
def test_raw_input_contents_match_onnxruntime_for_all_569_rows(served: Served) -> None:
    """tritonclient's default (set_data_from_numpy: raw bytes), each row alone; the outputs come back
    as raw_output_contents, which as_numpy reads."""
    x, _ = breast_cancer()
    labels, probas = reference(x)
    assert len(x) == 569
    with served.client() as client:
        for i in range(len(x)):
            result = client.infer(MODEL, [rows_input(x[i : i + 1])], request_id=f"row-{i}", headers=served.auth())
            assert result.get_response().id == f"row-{i}" and result.get_response().model_version == "1"
            assert result.as_numpy("label").tolist() == [labels[i]]
            np.testing.assert_allclose(result.as_numpy("probabilities")[0], probas[i], atol=1e-6, rtol=0)
        wanted = [triton.InferRequestedOutput("probabilities")]
        only = client.infer(MODEL, [rows_input(x[:3])], outputs=wanted, headers=served.auth())
    assert only.as_numpy("label") is None and only.as_numpy("probabilities").shape == (3, 2)


def test_typed_contents_match_onnxruntime_for_all_569_rows(served: Served) -> None:
    """Typed contents (fp32_contents) in batches of 50: the outputs come back typed too."""
    x, _ = breast_cancer()
    labels, probas = reference(x)
    got_labels: list[int] = []
    got_probas: list[float] = []
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for start in range(0, len(x), 50):
            chunk = x[start : start + 50]
            answer = stub.ModelInfer(typed_request(chunk, id=f"chunk-{start}"), metadata=served.metadata())
            assert answer.id == f"chunk-{start}" and not answer.raw_output_contents
            outputs = {o.name: o for o in answer.outputs}
            assert outputs["label"].datatype == "INT64" and list(outputs["probabilities"].shape) == [len(chunk), 2]
            got_labels += outputs["label"].contents.int64_contents
            got_probas += outputs["probabilities"].contents.fp32_contents
    assert got_labels == labels.tolist()
    np.testing.assert_allclose(np.array(got_probas).reshape(-1, 2), probas, atol=1e-6, rtol=0)


def test_a_stream_of_1000_requests_is_answered_in_full_and_in_order(served: Served) -> None:
    x, _ = breast_cancer()
    labels, probas = reference(x)
    results: list[tuple[Any, Any]] = []
    done = threading.Event()

    def collect(result: Any, error: Any) -> None:
        results.append((result, error))
        if len(results) == 1000:
            done.set()

    with served.client() as client:
        client.start_stream(collect, headers=served.auth())
        for i in range(1000):
            client.async_stream_infer(MODEL, [rows_input(x[i % 569 : i % 569 + 1])], request_id=str(i))
        assert done.wait(120), f"{len(results)} of 1000 answered"
        client.stop_stream()
    assert [error for _, error in results if error is not None] == []
    assert [int(result.get_response().id) for result, _ in results] == list(range(1000)), "in the order sent"
    for result, _ in results:
        row = int(result.get_response().id) % 569
        assert result.as_numpy("label").tolist() == [labels[row]]
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], probas[row], atol=1e-6, rtol=0)


def test_a_failing_request_of_a_stream_is_its_error_message_and_the_stream_goes_on(served: Served) -> None:
    x, _ = breast_cancer()
    results: list[tuple[Any, Any]] = []
    done = threading.Event()

    def collect(result: Any, error: Any) -> None:
        results.append((result, error))
        if len(results) == 3:
            done.set()

    with served.client() as client:
        client.start_stream(collect, headers=served.auth())
        client.async_stream_infer(MODEL, [rows_input(x[:1])], request_id="a")
        client.async_stream_infer(MODEL, [rows_input(x[:1, :29].copy())], request_id="b")
        client.async_stream_infer(MODEL, [rows_input(x[1:2])], request_id="c")
        assert done.wait(30)
        client.stop_stream()
    (first, e1), (_, e2), (third, e3) = results
    assert e1 is None and e3 is None and first.get_response().id == "a" and third.get_response().id == "c"
    assert e2 is not None and "must have shape [N, 30]" in e2.message()


def test_an_idempotency_key_replays_the_first_answer_and_refuses_another_request(served: Served) -> None:
    x, _ = breast_cancer()
    key = served.auth() | {"idempotency-key": f"grpc-{time.time_ns()}"}
    with served.client() as client:
        first = client.infer(MODEL, [rows_input(x[:2])], headers=key).get_response()
        again = client.infer(MODEL, [rows_input(x[:2])], headers=key).get_response()
        other = refused(lambda: client.infer(MODEL, [rows_input(x[2:4])], headers=key))
    assert first.id == again.id and list(first.raw_output_contents) == list(again.raw_output_contents)
    assert other.status() == "StatusCode.INVALID_ARGUMENT" and "Idempotency-Key" in other.message()


def test_on_a_stream_an_idempotency_key_is_per_request_id(served: Served) -> None:
    """A stream's idempotency-key keys each request by its id: a second stream with the same key
    and requests gets the first answers back, other requests under those ids are refused (the key is
    used), and so is a request without an id."""
    x, _ = breast_cancer()
    metadata = served.metadata(**{"idempotency-key": f"stream-{time.time_ns()}"})
    requests = [typed_request(x[i : i + 1], id=f"r{i}") for i in range(5)]
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = list(stub.ModelStreamInfer(iter(requests), metadata=metadata, timeout=30))
        again = list(stub.ModelStreamInfer(iter(requests), metadata=metadata, timeout=30))
        changed = [typed_request(x[i + 100 : i + 101], id=f"r{i}") for i in range(5)]
        refused_all = list(stub.ModelStreamInfer(iter(changed), metadata=metadata, timeout=30))
        (anonymous,) = list(stub.ModelStreamInfer(iter([typed_request(x[:1])]), metadata=metadata, timeout=30))
    assert [r.error_message for r in first + again] == [""] * 10
    assert [r.infer_response.id for r in first] == [f"r{i}" for i in range(5)]
    assert [r.infer_response.outputs[0].contents.int64_contents for r in first] == [
        r.infer_response.outputs[0].contents.int64_contents for r in again
    ]
    assert all("Idempotency-Key" in r.error_message for r in refused_all), "another request under a used key"
    assert "needs an id" in anonymous.error_message


# each status code, decoded by the client ---------------------------------------------------
def test_unauthenticated_without_a_key_or_with_a_bad_one(served: Served) -> None:
    x, _ = breast_cancer()
    with served.client() as client:
        for headers in (None, {"authorization": "Bearer bst_nope_nothing"}, {"authorization": "Basic abc"}):
            for call in (
                lambda h=headers: client.infer(MODEL, [rows_input(x[:1])], headers=h),
                lambda h=headers: client.get_model_metadata(MODEL, headers=h),
                lambda h=headers: client.is_model_ready(MODEL, headers=h),
            ):
                error = refused(call)
                assert error.status() == "StatusCode.UNAUTHENTICATED", error
                assert "bst_nope" not in error.message()


def test_permission_denied_for_a_key_without_the_predict_scope(served: Served) -> None:
    x, _ = breast_cancer()
    with served.client() as client:
        error = refused(lambda: client.infer(MODEL, [rows_input(x[:1])], headers=served.auth(served.reader)))
        assert client.get_model_metadata(MODEL, headers=served.auth(served.reader)).name == MODEL
    assert error.status() == "StatusCode.PERMISSION_DENIED" and "predict" in error.message()


def test_invalid_argument_for_bad_tensors(served: Served) -> None:
    x, _ = breast_cancer()
    row = x[:1]
    wrong_type = triton.InferInput("input", [1, 30], "FP64")
    wrong_type.set_data_from_numpy(row.astype(np.float64))
    with served.client() as client:
        cases = {
            "wrong shape": ([rows_input(x[:1, :29].copy())], "must have shape [N, 30]"),
            "wrong datatype": ([wrong_type], "must have datatype FP32"),
            "unknown input": ([triton.InferInput("nope", [1, 30], "FP32").set_data_from_numpy(row)], "unknown input"),
        }
        for name, (inputs, says) in cases.items():
            error = refused(lambda inputs=inputs: client.infer(MODEL, inputs, headers=served.auth()))
            assert error.status() == "StatusCode.INVALID_ARGUMENT", (name, error)
            assert says in error.message(), (name, error.message())

    def sent(request: service_pb2.ModelInferRequest) -> grpc.RpcError:
        with grpc.insecure_channel(served.target) as channel, pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=served.metadata())
        return caught.value

    raw = service_pb2.ModelInferRequest(model_name=MODEL)
    raw.inputs.add(name="input", datatype="FP32", shape=[1, 30])
    raw.raw_input_contents.append(row.tobytes()[:-4])  # 116 bytes for 120
    short = typed_request(x[:1, :29])
    short.inputs[0].shape[:] = [1, 30]  # 29 values for 30
    misplaced = typed_request(row)
    misplaced.inputs[0].contents.ClearField("fp32_contents")
    misplaced.inputs[0].contents.int_contents.extend([1] * 30)
    both = typed_request(row)
    both.raw_input_contents.append(row.tobytes())
    nan = typed_request(np.full((1, 30), np.nan, np.float32))
    for request, says in (
        (raw, "116 bytes do not fill shape [1, 30]"),
        (short, "29 values do not fill shape [1, 30]"),
        (misplaced, "its values go in contents.fp32_contents"),
        (both, "has contents although the request has raw_input_contents"),
        (nan, "not a finite float32"),
    ):
        error = sent(request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and says in error.details(), error


def test_not_found_for_an_unknown_model_or_version_and_invalid_argument_for_no_version(served: Served) -> None:
    x, _ = breast_cancer()
    with served.client() as client:
        for model, version in (("no-such-model", ""), (MODEL, "7"), (MODEL, "123456789")):
            for call in (
                lambda m=model, v=version: client.infer(m, [rows_input(x[:1])], model_version=v, headers=served.auth()),
                lambda m=model, v=version: client.is_model_ready(m, model_version=v, headers=served.auth()),
                lambda m=model, v=version: client.get_model_metadata(m, model_version=v, headers=served.auth()),
            ):
                error = refused(call)
                assert error.status() == "StatusCode.NOT_FOUND", (model, version, error)
                assert model in error.message()
        for version in ("latest", "0", "-1", "1.0"):  # as HTTP's /versions/{version}: not a version at all
            error = refused(
                lambda v=version: client.infer(MODEL, [rows_input(x[:1])], model_version=v, headers=served.auth())
            )
            assert error.status() == "StatusCode.INVALID_ARGUMENT" and "positive integer" in error.message(), error


def test_resource_exhausted_with_retry_after_for_a_tenant_over_its_budget(served: Served) -> None:
    served.admin.set_tenant("thrifty", None, limits={"burst": 1, "units_per_s": 0.001})
    key = served.admin.create_key("thrifty", "budget")["key"]
    known_everywhere(served, key)
    x, _ = breast_cancer()
    with grpc.insecure_channel(served.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = typed_request(x[:50])
        for _ in range(50):
            try:
                stub.ModelInfer(request, metadata=served.metadata(key))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
                trailers = dict(error.trailing_metadata())
                assert int(trailers["retry-after"]) >= 1 and "ratelimit" in trailers
                break
        else:
            pytest.fail("a tenant with a budget of 1 unit was never refused")
    with served.client() as client:
        exhausted = refused(lambda: client.infer(MODEL, [rows_input(x[:50])], headers=served.auth(key)))
    assert exhausted.status() == "StatusCode.RESOURCE_EXHAUSTED" and exhausted.message()


def test_unavailable_while_the_kill_switch_is_on(served: Served) -> None:
    x, _ = breast_cancer()
    served.admin.set_enabled(MODEL, False)
    try:
        with served.client() as client:

            def disabled() -> bool:
                return all(
                    refused(lambda: client.infer(MODEL, [rows_input(x[:1])], headers=served.auth())).status()
                    == "StatusCode.UNAVAILABLE"
                    for _ in range(8)
                )

            wait_until(disabled, 10, "every gateway to obey the kill switch")
            error = refused(lambda: client.infer(MODEL, [rows_input(x[:1])], headers=served.auth()))
        assert "disabled" in error.message()
        with grpc.insecure_channel(served.target) as channel, pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                typed_request(x[:1]), metadata=served.metadata()
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(caught.value.trailing_metadata())["retry-after"] == "30"
    finally:
        served.admin.set_enabled(MODEL, True)
    with served.client() as client:
        wait_until(lambda: client.is_model_ready(MODEL, headers=served.auth()), 10, "the model back")


def test_deadline_exceeded_when_no_worker_answers_in_time(served: Served) -> None:
    """The worker is frozen: the server's own deadline (x-bastion-timeout-ms) and the client's."""
    x, _ = breast_cancer()
    worker = served.up.pids()["worker-0"]
    os.killpg(worker, signal.SIGSTOP)
    try:
        with served.client() as client:
            timed = served.auth() | {"x-bastion-timeout-ms": "300"}
            ours = refused(lambda: client.infer(MODEL, [rows_input(x[:1])], headers=timed))
            theirs = refused(
                lambda: client.infer(MODEL, [rows_input(x[:1])], headers=served.auth(), client_timeout=0.5)
            )
    finally:
        os.killpg(worker, signal.SIGCONT)
    assert ours.status() == "StatusCode.DEADLINE_EXCEEDED" and "no result within 0.3 s" in ours.message()
    # the client's deadline is the server's too: it answers (and abandons the job) just before it
    assert theirs.status() == "StatusCode.DEADLINE_EXCEEDED" and "the job was abandoned" in theirs.message()


def test_a_call_without_a_credential_is_refused_before_its_message_is_sent(served: Served) -> None:
    """An anonymous caller cannot hold calls open by never sending its message."""
    release = threading.Event()

    def never() -> Iterator[bytes]:
        release.wait(20)
        yield b""

    with grpc.insecure_channel(served.target) as channel:
        call = channel.stream_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        began = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as refused_at_once:
                call(never(), timeout=10)
        finally:
            release.set()
    assert refused_at_once.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused_at_once.value
    assert "authorization" in (refused_at_once.value.details() or "")
    assert time.monotonic() - began < 5, "refused on its headers, not after a message or a timeout"


def test_a_message_over_the_limit_is_resource_exhausted(served: Served) -> None:
    rows = np.ones((MAX_MESSAGE // 120 + 10, 30), np.float32)
    with served.client() as client:
        error = refused(lambda: client.infer(MODEL, [rows_input(rows)], headers=served.auth()))
        assert client.is_server_live()
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and "larger than max" in error.message()


# hostile bytes ----------------------------------------------------------------------------
def test_malformed_messages_are_invalid_argument_and_the_server_keeps_serving(served: Served) -> None:
    x, _ = breast_cancer()
    valid = typed_request(x[:1]).SerializeToString()
    with grpc.insecure_channel(served.target) as channel:
        send = channel.unary_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        for garbage in (b"\xff\xff\xff\xff", valid[:-7], b"\x0a\xff\xff\xff\xff\x0f", os.urandom(4096)):
            with pytest.raises(grpc.RpcError) as caught:
                send(garbage, metadata=served.metadata())
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
            assert "not a valid ModelInferRequest" in caught.value.details()
        with pytest.raises(grpc.RpcError) as anonymous:
            send(b"\xff\xff\xff\xff")
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metadata = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as bad_metadata:
            metadata(b"\x12\xff", metadata=served.metadata())
        assert bad_metadata.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with served.client() as client:
        assert client.infer(MODEL, [rows_input(x[:1])], headers=served.auth()).as_numpy("label") is not None


def _raw_connection(served: Served, payload: bytes) -> bytes:
    """Send ``payload`` on a bare TCP connection; what the server sent before it closed (or 3 s)."""
    host, port = served.target.split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=3) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pass
    return got


def test_truncated_and_garbage_frames_neither_crash_nor_hang_the_server(served: Served) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    headers_frame_cut = b"\x00\x03\xe8\x01\x04\x00\x00\x00\x01" + b"\x82\x86" * 5  # says 1000 bytes, has 10
    data_frame_bad_stream = b"\x00\x00\x05\x00\x01\x00\x00\x00\x00hello"  # DATA on stream 0: a protocol error
    for payload in (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        preface[:10],
        preface + settings + headers_frame_cut,
        preface + settings + data_frame_bad_stream,
        preface + os.urandom(2048),
    ):
        started = time.monotonic()
        _raw_connection(served, payload)
        assert time.monotonic() - started < 5
    with served.client() as client:
        assert client.is_server_live() and client.is_server_ready()


def test_grpc_calls_are_counted_in_the_gateways_metrics(served: Served) -> None:
    x, _ = breast_cancer()
    with served.client() as client:
        for _ in range(4):  # over both gateways, most likely; the counts are summed below anyway
            client.infer(MODEL, [rows_input(x[:1])], headers=served.auth())
            refused(lambda: client.infer(MODEL, [rows_input(x[:1, :29].copy())], headers=served.auth()))
            refused(lambda: client.infer(MODEL, [rows_input(x[:1])]))
    ports = json.loads((served.up.data_dir / "endpoints.json").read_text())["metrics"]

    def scraped() -> list[tuple[str, str]]:
        text = "".join(
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for name, port in ports.items()
            if name.startswith("gateway") and port
        )
        return re.findall(r'bastion_gateway_requests_total\{route="grpc\.ModelInfer",status="(\w+)"\} (\S+)', text)

    # a refused call may be counted just after its caller has the answer: wait for the counts a moment
    wanted = {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED"}
    wait_until(lambda: wanted <= {status for status, _ in scraped()}, 10, "the gateways to count the calls")
    counted = scraped()
    assert wanted <= {status for status, _ in counted}, counted
    assert sum(float(n) for status, n in counted if status == "OK") >= 4


def test_the_messages_and_methods_are_those_tritonclient_speaks() -> None:
    """Every message, field number, type and method of our proto is tritonclient's (whose proto has
    more: Triton's own extensions, which this server does not serve)."""
    from bastion.gateway.grpc import inference_pb2 as ours

    theirs = service_pb2.DESCRIPTOR

    def fields(message: Any) -> dict[str, tuple[int, int, bool, str]]:
        return {
            f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "")
            for f in message.fields
        }

    def walk(message: Any) -> Iterator[Any]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    compared = 0
    for top in ours.DESCRIPTOR.message_types_by_name.values():
        for message in walk(top):
            if message.full_name == "inference.ModelMetadataResponse.PropertiesEntry":
                continue  # the specification's map, which Triton's proto lacks
            mine, triton_fields = fields(message), fields(theirs.pool.FindMessageTypeByName(message.full_name))
            extra = "properties" if message.full_name == "inference.ModelMetadataResponse" else None
            assert {k: v for k, v in mine.items() if k != extra} == triton_fields, message.full_name
            compared += 1
    assert compared == 24
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    triton_service = theirs.services_by_name["GRPCInferenceService"]
    assert service.full_name == triton_service.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        other = triton_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name,
            other.output_type.full_name,
        )
        assert (method.client_streaming, method.server_streaming) == (other.client_streaming, other.server_streaming)
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
    }


def test_a_taken_grpc_port_is_reported_before_anything_starts(served: Served, tmp_path: Path) -> None:
    """The running instance holds its gRPC port: a second bastion up asking for it says so and
    exits, before it starts a process."""
    grpc_port = int(served.target.rsplit(":", 1)[1])
    argv = [sys.executable, "-m", "bastion", "up", "--data-dir", str(tmp_path), "--gateway-port", str(free_port())]
    argv += ["--control-port", str(free_port()), "--grpc-port", str(grpc_port)]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    assert f"port {grpc_port}" in second.stderr and "--grpc-port" in second.stderr
    assert "Traceback" not in second.stderr and not (tmp_path / "processes.json").exists()


def test_the_committed_modules_are_generated_from_the_proto() -> None:
    root = Path(__file__).resolve().parent.parent
    check = subprocess.run([sys.executable, "scripts/gen_grpc.py", "--check"], cwd=root, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_peer_is_counted_by_its_address() -> None:
    from bastion.gateway.grpc.service import peer_host

    assert peer_host("ipv4:203.0.113.9:40312") == "203.0.113.9"
    assert peer_host("ipv6:%5B2001:db8::1%5D:40312") == "2001:db8::1"
    assert peer_host("ipv6:[::1]:40312") == "::1"
    assert peer_host("ipv6:%5Bfe80::1%25eth0%5D:1") == "fe80::1"
    assert peer_host("unix:/tmp/socket") == "unix:/tmp/socket"
