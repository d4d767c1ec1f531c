"""The gRPC attack surface: method x scope matrix, tenant isolation by policy, the stream's window,
and the abuse guard counting a peer's failures on gRPC as on HTTP.

Requests are built with tritonclient's own generated messages and stubs
(``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``), over real sockets, against real processes.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import onnx
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bastion import demo
from bastion.constants import SCOPES
from bastion.embedded.redis_server import free_port
from tests.support import Stack, running, wait_until

MODEL = demo.MODEL_NAME
ROW = [1.0] * 30
SERVICE = "inference.GRPCInferenceService"
# What each method asks of its caller (any one scope): the specification this suite checks.
PUBLIC: tuple[str, ...] = ()
NEEDS = {
    "ServerLive": PUBLIC,
    "ServerReady": PUBLIC,
    "ServerMetadata": PUBLIC,
    "ModelReady": ("models:read", "predict"),
    "ModelMetadata": ("models:read", "predict"),
    "ModelInfer": ("predict",),
    "ModelStreamInfer": ("predict",),
}
STREAM_WINDOW = 16  # bastion.gateway.grpc.service.STREAM_WINDOW


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("grpc-surface"), workers=1, gateways=1, grpc_port=free_port()) as s:
        yield s


def target(stack: Stack) -> str:
    return f"127.0.0.1:{stack.settings.grpc_port}"


def auth(key: str | None, **more: str) -> tuple[tuple[str, str], ...]:
    found = (("authorization", f"Bearer {key}"),) if key else ()
    return (*found, *more.items())


def infer_request(version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL, model_version=version, id="probe")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 30]).contents.fp32_contents.extend(ROW)
    return request


def calls(stub: Any, version: str = "") -> dict[str, Callable[[tuple[tuple[str, str], ...]], Any]]:
    """One valid request per method (the stream: one request, read to its end)."""
    return {
        "ServerLive": lambda md: stub.ServerLive(service_pb2.ServerLiveRequest(), metadata=md),
        "ServerReady": lambda md: stub.ServerReady(service_pb2.ServerReadyRequest(), metadata=md),
        "ServerMetadata": lambda md: stub.ServerMetadata(service_pb2.ServerMetadataRequest(), metadata=md),
        "ModelReady": lambda md: stub.ModelReady(
            service_pb2.ModelReadyRequest(name=MODEL, version=version), metadata=md
        ),
        "ModelMetadata": lambda md: stub.ModelMetadata(
            service_pb2.ModelMetadataRequest(name=MODEL, version=version), metadata=md
        ),
        "ModelInfer": lambda md: stub.ModelInfer(infer_request(version), metadata=md),
        "ModelStreamInfer": lambda md: list(stub.ModelStreamInfer(iter([infer_request(version)]), metadata=md)),
    }


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        answer = call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    if isinstance(answer, list) and answer and answer[0].error_message:  # a stream's one response
        return grpc.StatusCode.UNKNOWN, answer[0].error_message
    return grpc.StatusCode.OK, ""


def test_every_method_refuses_every_scope_it_should(stack: Stack) -> None:
    keys = {scope: stack.admin.create_key("operators", f"grpc-{scope}", scopes=[scope])["key"] for scope in SCOPES}
    time.sleep(0.5)
    checked = 0
    with grpc.insecure_channel(target(stack)) as channel:
        methods = calls(service_pb2_grpc.GRPCInferenceServiceStub(channel))
        assert set(methods) == set(NEEDS)
        for method, call in methods.items():
            anonymous, detail = code_of(lambda call=call: call(auth(None)))
            assert anonymous == (grpc.StatusCode.OK if NEEDS[method] == PUBLIC else grpc.StatusCode.UNAUTHENTICATED)
            for scope, key in keys.items():
                code, detail = code_of(lambda call=call, key=key: call(auth(key)))
                where = f"{method} with scope {scope}: {code} {detail[:120]}"
                if NEEDS[method] == PUBLIC or scope in NEEDS[method]:
                    assert code == grpc.StatusCode.OK, where
                elif scope == "admin":
                    assert code == grpc.StatusCode.UNAUTHENTICATED, where  # admin keys never reach a gateway
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, where
                    assert "lacks the scope" in detail and key not in detail, where
                checked += 1
        # Triton's other methods (repository, shared memory, statistics...) are not served, to anyone.
        served = set(NEEDS)
        for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            if method.name in served:
                continue
            send = channel.unary_unary(
                f"/{SERVICE}/{method.name}", request_serializer=bytes, response_deserializer=bytes
            )
            for key in (None, keys["predict"], keys["admin"]):
                code, _ = code_of(lambda send=send, key=key: send(b"", metadata=auth(key)))
                assert code == grpc.StatusCode.UNIMPLEMENTED, (method.name, code)
                checked += 1
    print(f"gRPC method x scope matrix: {checked} pairs checked")
    assert checked >= len(NEEDS) * len(SCOPES) + 13 * 3


@pytest.fixture(scope="module")
def policed(stack: Stack) -> Iterator[tuple[Stack, int, int]]:
    """Version 2 is a 50% canary that policy keeps from tenant globex; version 3 is registered but
    takes no traffic."""
    variant = onnx.load_model_from_string(demo.model_bytes())
    variant.doc_string = "a candidate"
    v2 = int(stack.admin.register(MODEL, variant.SerializeToString(), activate=False)["version"])
    variant.doc_string = "another candidate"
    v3 = int(stack.admin.register(MODEL, variant.SerializeToString(), activate=False)["version"])
    stack.admin.deploy(
        MODEL,
        [{"version": 1, "weight": 50}, {"version": v2, "weight": 50, "role": "canary"}],
        rules=[{"tenant": "globex", "allow": [1]}],
    )
    time.sleep(0.5)
    try:
        yield stack, v2, v3
    finally:
        stack.admin.deploy(MODEL, [{"version": 1}])
        time.sleep(0.3)


def test_a_version_policy_keeps_from_a_tenant_is_refused_to_it_by_every_method(policed: tuple[Stack, int, int]) -> None:
    stack, v2, _ = policed
    with grpc.insecure_channel(target(stack)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        acme, globex = auth(stack.keys["acme"]), auth(stack.keys["globex"])
        assert stub.ModelInfer(infer_request(str(v2)), metadata=acme).model_version == str(v2)
        assert stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=MODEL), metadata=acme).versions == ["1", "2"]
        assert stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=MODEL), metadata=globex).versions == ["1"]
        refusals = set()
        for method, call in calls(stub, version=str(v2)).items():
            if NEEDS[method] == PUBLIC:
                continue
            code, detail = code_of(lambda call=call: call(globex))
            if method == "ModelStreamInfer":
                assert code == grpc.StatusCode.UNKNOWN, "a stream's request fails in its response"
            else:
                assert code == grpc.StatusCode.NOT_FOUND, (method, code, detail)  # as a version that does not exist
            refusals.add(detail)
        assert len(refusals) == 1, f"every method says the same: {refusals}"
        # Unpinned, globex is routed only to what its policy allows, whatever its canary bucket.
        trusted = stack.keys["globex-subjects"]
        for subject in range(40):
            answer = stub.ModelInfer(infer_request(), metadata=auth(trusted, **{"x-bastion-subject": f"s{subject}"}))
            assert answer.model_version == "1"


def test_no_method_tells_an_undeployed_version_from_one_that_never_existed(policed: tuple[Stack, int, int]) -> None:
    """Version 3 exists but takes no traffic; version 99 does not exist: the same answer, to any tenant."""
    stack, _, v3 = policed
    with grpc.insecure_channel(target(stack)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for tenant in ("acme", "globex"):
            key = auth(stack.keys[tenant])
            for method in ("ModelReady", "ModelMetadata", "ModelInfer", "ModelStreamInfer"):
                answers = []
                for version in (str(v3), "99"):
                    code, detail = code_of(lambda m=method, v=version, k=key: calls(stub, v)[m](k))
                    answers.append((code, re.sub(rf"\b{version}\b", "N", detail)))
                expected = grpc.StatusCode.UNKNOWN if method == "ModelStreamInfer" else grpc.StatusCode.NOT_FOUND
                assert answers[0] == answers[1] and answers[0][0] == expected, (tenant, method, answers)


def test_a_stream_has_at_most_its_window_of_requests_queued(stack: Stack) -> None:
    """With the worker frozen nothing is answered: the stream's requests beyond its window are not
    read, so they are never queued; the client's cancel ends the stream."""
    redis = stack.redis_client()
    queue = f"q:{MODEL}:sync"
    before = int(redis.xlen(queue))
    stack.signal("worker-0", signal.SIGSTOP)
    try:
        with grpc.insecure_channel(target(stack)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            sent = 0

            def requests() -> Iterator[service_pb2.ModelInferRequest]:
                nonlocal sent
                for _ in range(500):
                    sent += 1
                    yield infer_request()

            stream = stub.ModelStreamInfer(requests(), metadata=auth(stack.keys["acme"]))
            wait_until(lambda: int(redis.xlen(queue)) - before >= STREAM_WINDOW, 10, "the window to fill")
            time.sleep(1.0)
            queued = int(redis.xlen(queue)) - before
            stream.cancel()
        assert queued == STREAM_WINDOW, f"{queued} queued (of {sent} sent)"
    finally:
        stack.signal("worker-0", signal.SIGCONT)
        redis.close()
    with grpc.insecure_channel(target(stack)) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(infer_request(), metadata=auth(stack.keys["acme"]), timeout=30).outputs


# abuse ------------------------------------------------------------------------------------
GUARDED: dict[str, Any] = {
    "workers": 0,
    "trusted_proxies": "127.0.0.1",  # test clients stand for other addresses with x-forwarded-for
    "abuse_tarpit_after": 3,
    "abuse_ban_after": 6,
    "abuse_tarpit_step_ms": 10,
    "abuse_ban_s": 60,
}


def test_a_peer_that_keeps_failing_is_banned_on_grpc_and_on_http(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running(tmp_path_factory.mktemp("grpc-abuse"), grpc_port=free_port(), **GUARDED) as stack:
        with grpc.insecure_channel(target(stack)) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            def ready(address: str, key: str = "bst_bad_key") -> tuple[grpc.StatusCode, str, dict[str, str]]:
                try:
                    stub.ModelReady(
                        service_pb2.ModelReadyRequest(name=MODEL), metadata=auth(key, **{"x-forwarded-for": address})
                    )
                except grpc.RpcError as error:
                    return error.code(), error.details() or "", dict(error.trailing_metadata() or ())
                return grpc.StatusCode.OK, "", {}

            attacker = "2001:db8:1:2::1"
            codes = [ready(attacker)[0] for _ in range(6)]
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 6
            neighbour = "2001:db8:1:2::ffff"  # the same /64
            for address in (attacker, neighbour):
                code, detail, trailers = ready(address, stack.keys["acme"])
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "blocked" in detail, (address, code, detail)
                assert 1 <= int(trailers["retry-after"]) <= 61
            assert ready("2001:db8:1:3::1", stack.keys["acme"])[0] == grpc.StatusCode.OK, "another /64 is not banned"
            banned_http = httpx.get(
                f"{stack.gateway}/v2/models/{MODEL}",
                headers={"Authorization": f"Bearer {stack.keys['acme']}", "X-Forwarded-For": neighbour},
            )
            assert banned_http.status_code == 429, "a ban on gRPC holds on HTTP"
            with stack.client(headers={"X-Forwarded-For": "198.51.100.7"}) as http:
                for _ in range(6):
                    assert http.get("/v1/jobs/none", headers={"Authorization": "Bearer bst_bad_key"}).status_code == 401
            code, detail, _ = ready("198.51.100.7", stack.keys["acme"])
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, "a ban on HTTP holds on gRPC"


def test_a_client_that_pings_too_often_is_sent_away(stack: Stack) -> None:
    """Keepalive enforcement: pings more often than grpc_keepalive_min_s earn strikes, then GOAWAY."""
    options = [
        ("grpc.keepalive_time_ms", 50),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    failed = threading.Event()
    with grpc.insecure_channel(target(stack), options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def requests() -> Iterator[service_pb2.ModelInferRequest]:
            failed.wait(30)  # a quiet stream: nothing sent, the client pings meanwhile
            yield from ()

        stream = stub.ModelStreamInfer(requests(), metadata=auth(stack.keys["acme"]), timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        failed.set()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert "ping" in (caught.value.details() or "").lower(), caught.value.details()


def test_an_oidc_token_authenticates_a_grpc_call_as_an_api_key_would(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.security.test_jwt import AUDIENCE, Issuer

    issuer = Issuer()
    try:
        settings = {"oidc_issuer": issuer.url, "oidc_audience": AUDIENCE, "workers": 0, "grpc_port": free_port()}
        with running(tmp_path_factory.mktemp("grpc-oidc"), **settings) as stack:
            with grpc.insecure_channel(target(stack)) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                request = service_pb2.ModelMetadataRequest(name=MODEL)
                for kid in ("rsa-1", "ec-1", "ed-1"):
                    assert stub.ModelMetadata(request, metadata=auth(issuer.token(kid))).name == MODEL
                for token, expected in (
                    (issuer.token(scope="jobs"), grpc.StatusCode.PERMISSION_DENIED),
                    (issuer.token(tenant="nobody"), grpc.StatusCode.PERMISSION_DENIED),
                    (issuer.token(exp=int(time.time()) - 60), grpc.StatusCode.UNAUTHENTICATED),
                    (issuer.token()[:-8] + "AAAAAAAA", grpc.StatusCode.UNAUTHENTICATED),
                ):
                    code, detail = code_of(lambda token=token: stub.ModelMetadata(request, metadata=auth(token)))
                    assert code == expected and token not in detail, (code, detail)
    finally:
        issuer.close()
