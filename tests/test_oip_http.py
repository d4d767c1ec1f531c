"""The Open Inference Protocol v2 over HTTP as its reference client speaks it: ``tritonclient.http``,
unchanged, against a real stack (JSON and binary tensors, named versions, errors it decodes), and
the binary tensor extension's framing and the ``{"error": ...}`` shape checked byte by byte."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from bastion import demo
from tests.support import Stack, breast_cancer, running, wait_until

MODEL = demo.MODEL_NAME
INFER = f"/v2/models/{MODEL}/infer"
ROW = np.ones((1, 30), dtype=np.float32)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Version 1 (primary) and 2 (canary) take traffic, globex may reach only version 1; version 3 is
    a shadow and version 4 is registered but not deployed: neither takes traffic."""
    with running(tmp_path_factory.mktemp("oip"), workers=1) as s:
        for label in ("a canary", "a shadow", "never deployed"):
            variant = onnx.load_model_from_string(demo.model_bytes())
            variant.doc_string = label
            s.admin.register(MODEL, variant.SerializeToString(), activate=False)
        s.admin.deploy(
            MODEL,
            [
                {"version": 1, "weight": 90},
                {"version": 2, "weight": 10, "role": "canary"},
                {"version": 3, "weight": 1, "role": "shadow"},
            ],
            rules=[{"tenant": "globex", "allow": [1]}],
        )
        s.keys["jobs-only"] = s.admin.create_key("acme", "jobs only", scopes=["jobs"])["key"]
        time.sleep(0.5)
        yield s


def _client(stack: Stack) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(stack.gateway.removeprefix("http://"), network_timeout=60.0)


def _auth(stack: Stack, tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.keys[tenant]}"}


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(demo.model_bytes(), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"input": x})
    return label, proba


def _input(x: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _server_said(error: InferenceServerException, status: str, says: str) -> None:
    """tritonclient decoded the server's own message (not its 'exception ... while decoding')."""
    message = error.message()
    assert error.status() == status, error
    assert says in message and "while decoding the response" not in message, message


def _error(r: httpx.Response, status: int, says: str) -> str:
    """An OIP error: the status, ``application/json`` and ``{"error": <message>}`` saying ``says``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert says.lower() in body["error"].lower(), body["error"]
    assert "Traceback" not in r.text
    message: str = body["error"]
    return message


def _framed(
    inputs: list[tuple[dict[str, Any], bytes]], length: int | None = None, **doc: Any
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: the JSON header, then each input's bytes (``length`` overrides the
    header's declared length)."""
    header = json.dumps({"inputs": [i for i, _ in inputs], **doc}).encode()
    declared = len(header) if length is None else length
    return header + b"".join(raw for _, raw in inputs), {"Inference-Header-Content-Length": str(declared)}


def _binary_input(x: np.ndarray, datatype: str = "FP32", size: int | None = None) -> tuple[dict[str, Any], bytes]:
    raw = x.tobytes()
    meta = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw) if size is None else size},
    }
    return meta, raw


# tritonclient, unchanged ------------------------------------------------------------------
def test_tritonclient_sees_the_server_and_the_model_live_and_ready(stack: Stack) -> None:
    client = _client(stack)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(MODEL, headers=_auth(stack))
        assert client.is_model_ready(MODEL, "1", headers=_auth(stack))
        assert client.is_model_ready(MODEL, "2", headers=_auth(stack))
        assert not client.is_model_ready(MODEL, "2", headers=_auth(stack, "globex")), "policy keeps globex off v2"
        assert not client.is_model_ready(MODEL, "3", headers=_auth(stack)), "a shadow takes no traffic"
        assert not client.is_model_ready(MODEL, "4", headers=_auth(stack)), "an undeployed version takes none"
        assert not client.is_model_ready("no-such-model", headers=_auth(stack))
        assert not client.is_model_ready(MODEL), "no credentials"
    finally:
        client.close()


def test_tritonclient_reads_model_metadata_with_only_the_reachable_versions(stack: Stack) -> None:
    client = _client(stack)
    try:
        meta = client.get_model_metadata(MODEL, headers=_auth(stack))
        assert meta["name"] == MODEL and meta["versions"] == ["1", "2"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"label": "INT64", "probabilities": "FP32"}
        assert client.get_model_metadata(MODEL, "2", headers=_auth(stack))["inputs"] == meta["inputs"]
        assert client.get_model_metadata(MODEL, headers=_auth(stack, "globex"))["versions"] == ["1"]
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata(MODEL, "2", headers=_auth(stack, "globex"))
        _server_said(refused.value, "404", "has no version 2 taking traffic")  # as for one that does not exist
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata(MODEL, "4", headers=_auth(stack))
        _server_said(missing.value, "404", "has no version 4 taking traffic")
    finally:
        client.close()


def test_tritonclient_binary_infer_of_all_569_rows_equals_onnxruntime(stack: Stack) -> None:
    """The client's defaults: the input as binary data, every output back as binary data."""
    x, _ = breast_cancer()
    labels, probas = _reference(x)
    client = _client(stack)
    try:
        result = client.infer(MODEL, [_input(x)], headers=_auth(stack), request_id="all-rows")
    finally:
        client.close()
    response = result.get_response()
    assert response["id"] == "all-rows" and response["model_name"] == MODEL
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in response["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), labels)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probas, atol=1e-6, rtol=0)
    assert result.as_numpy("probabilities").shape == (569, 2)


def test_tritonclient_json_infer_of_all_569_rows_equals_onnxruntime(stack: Stack) -> None:
    """JSON both ways (binary_data=False on the input and on each requested output), 100 rows a call."""
    x, _ = breast_cancer()
    labels, probas = _reference(x)
    got_labels, got_probas = [], []
    client = _client(stack)
    try:
        for start in range(0, len(x), 100):
            outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")]
            result = client.infer(
                MODEL, [_input(x[start : start + 100], binary=False)], outputs=outputs, headers=_auth(stack)
            )
            assert all("data" in o and "parameters" not in o for o in result.get_response()["outputs"])
            got_labels.append(result.as_numpy("label"))
            got_probas.append(result.as_numpy("probabilities"))
    finally:
        client.close()
    np.testing.assert_array_equal(np.concatenate(got_labels), labels)
    np.testing.assert_allclose(np.concatenate(got_probas), probas, atol=1e-6, rtol=0)


def test_tritonclient_gets_only_the_outputs_it_asks_for_each_in_its_own_form(stack: Stack) -> None:
    x, _ = breast_cancer()
    labels, probas = _reference(x[:7])
    client = _client(stack)
    try:
        only = client.infer(
            MODEL, [_input(x[:7])], outputs=[triton.InferRequestedOutput("probabilities")], headers=_auth(stack)
        )
        assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
        assert only.as_numpy("label") is None
        np.testing.assert_allclose(only.as_numpy("probabilities"), probas, atol=1e-6, rtol=0)
        mixed = client.infer(
            MODEL,
            [_input(x[:7], binary=False)],
            outputs=[
                triton.InferRequestedOutput("label", binary_data=False),
                triton.InferRequestedOutput("probabilities", binary_data=True),
            ],
            headers=_auth(stack),
        )
        described = {o["name"]: o for o in mixed.get_response()["outputs"]}
        assert "data" in described["label"] and "binary_data_size" in described["probabilities"]["parameters"]
        np.testing.assert_array_equal(mixed.as_numpy("label"), labels)
        np.testing.assert_allclose(mixed.as_numpy("probabilities"), probas, atol=1e-6, rtol=0)
    finally:
        client.close()


def test_tritonclient_infers_on_a_named_version_only_where_policy_allows(stack: Stack) -> None:
    x, _ = breast_cancer()
    labels, _ = _reference(x[:20])
    client = _client(stack)
    try:
        for version in ("1", "2"):
            result = client.infer(MODEL, [_input(x[:20])], model_version=version, headers=_auth(stack))
            assert result.get_response()["model_version"] == version
            np.testing.assert_array_equal(result.as_numpy("label"), labels)
        assert client.infer(MODEL, [_input(x[:20])], model_version="1", headers=_auth(stack, "globex"))
        for version, status, says in (
            ("2", "404", "has no version 2 taking traffic"),  # policy keeps it away: it answers as none
            ("3", "404", "has no version 3 taking traffic"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, [_input(x[:20])], model_version=version, headers=_auth(stack, "globex"))
            _server_said(refused.value, status, says)
    finally:
        client.close()


def test_tritonclient_decodes_the_servers_error_messages(stack: Stack) -> None:
    client = _client(stack)
    try:
        cases = [
            (
                lambda: client.infer(MODEL, [_input(np.ones((2, 29), np.float32))], headers=_auth(stack)),
                "400",
                "input 'input' must have shape [N, 30], got [2, 29]",
            ),
            (
                lambda: client.infer(MODEL, [_input(np.ones((2, 29), np.float32), binary=False)], headers=_auth(stack)),
                "400",
                "must have shape [N, 30]",
            ),
            (
                lambda: client.infer("no-such-model", [_input(ROW)], headers=_auth(stack)),
                "404",
                "no model 'no-such-model' is being served",
            ),
            (lambda: client.infer(MODEL, [_input(ROW)]), "401", "an API key or token is required"),
            (lambda: client.infer(MODEL, [_input(ROW)], headers=_auth(stack, "jobs-only")), "403", "lacks the scope"),
            (
                lambda: client.infer(
                    MODEL, [_input(ROW)], outputs=[triton.InferRequestedOutput("score")], headers=_auth(stack)
                ),
                "400",
                "unknown outputs ['score']",
            ),
            (
                lambda: client.infer(MODEL, [_input(ROW)], headers=_auth(stack), request_compression_algorithm="gzip"),
                "415",
                "compressed request bodies (Content-Encoding: gzip) are not supported",
            ),
            (
                lambda: client.infer(
                    MODEL,
                    [_input(ROW)],
                    outputs=[triton.InferRequestedOutput("label", class_count=2)],
                    headers=_auth(stack),
                ),
                "400",
                "classification extension",
            ),
        ]
        for call, status, says in cases:
            with pytest.raises(InferenceServerException) as refused:
                call()
            _server_said(refused.value, status, says)
    finally:
        client.close()


# the binary extension's framing, byte by byte -----------------------------------------------
def test_binary_sizes_that_do_not_add_up_are_400(stack: Stack) -> None:
    meta, raw = _binary_input(ROW)
    with stack.client() as http:
        body, headers = _framed([(meta, raw + b"\x00" * 8)])
        _error(http.post(INFER, content=body, headers=headers), 400, "add up to 120 bytes but 128 bytes follow")
        body, headers = _framed([(meta, raw[:-4])])
        _error(http.post(INFER, content=body, headers=headers), 400, "truncated")
        body, headers = _framed([_binary_input(ROW, size=-1)])
        _error(http.post(INFER, content=body, headers=headers), 400, "non-negative number of bytes")
        body, headers = _framed([_binary_input(ROW, size=116)])  # the sizes add up, the shape is not filled
        _error(http.post(INFER, content=body[:-4], headers=headers), 400, "116 bytes do not fill shape [1, 30]")


def test_a_header_length_beyond_the_body_or_not_a_number_is_400(stack: Stack) -> None:
    with stack.client() as http:
        body, headers = _framed([_binary_input(ROW)], length=10_000)
        _error(http.post(INFER, content=body, headers=headers), 400, "Inference-Header-Content-Length is 10000")
        for bad in ("-1", "12ab", "1e3", "9" * 40):
            r = http.post(INFER, content=body, headers={"Inference-Header-Content-Length": bad})
            _error(r, 400, "must be a number of bytes")
        body, headers = _framed([_binary_input(ROW)], length=20)  # cuts the JSON header short
        _error(http.post(INFER, content=body, headers=headers), 400, "not valid JSON")
        header = json.dumps({"inputs": {"input": 1}}).encode()
        r = http.post(
            INFER, content=header + b"\x00" * 8, headers={"Inference-Header-Content-Length": str(len(header))}
        )
        _error(r, 400, "the body must have a non-empty 'inputs' array")


def test_binary_data_size_without_the_header_or_beside_data_is_400(stack: Stack) -> None:
    meta, raw = _binary_input(ROW)
    with stack.client() as http:
        r = http.post(INFER, content=json.dumps({"inputs": [meta]}))
        _error(r, 400, "send the Inference-Header-Content-Length header")
        body, headers = _framed([({**meta, "data": ROW.ravel().tolist()}, raw)])
        _error(http.post(INFER, content=body, headers=headers), 400, "both 'data' and binary data")


def test_binary_wrong_datatype_shape_and_values_are_400(stack: Stack) -> None:
    with stack.client() as http:
        for x, datatype, says in (
            (ROW.astype(np.float64), "FP64", "must have datatype FP32, got 'FP64'"),
            (ROW.astype(np.int32), "INT32", "must have datatype FP32"),
            (np.ones((2, 30), np.float32), "FP32", None),  # a control: two rows are fine
            (np.ones((1, 29), np.float32), "FP32", "must have shape [N, 30], got [1, 29]"),
            (np.full((1, 30), np.nan, np.float32), "FP32", "not a finite float32"),
            (np.full((1, 30), np.inf, np.float32), "FP32", "not a finite float32"),
            (np.ones((1025, 30), np.float32), "FP32", "the limit is 1024"),
        ):
            body, headers = _framed([_binary_input(x, datatype)])
            r = http.post(INFER, content=body, headers=headers)
            if says is None:
                assert r.status_code == 200, r.text
            else:
                _error(r, 400, says)
        bytes_input = {"name": "input", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}
        body, headers = _framed([(bytes_input, b"\x05\x00\x00\x00hello")])
        _error(http.post(INFER, content=body, headers=headers), 400, "takes no BYTES (string) tensors")
        r = http.post(INFER, json={"inputs": [{"name": "input", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]})
        _error(r, 400, "must have datatype FP32: this model takes no BYTES")


def test_json_shape_contents_mismatch_and_unsupported_parameters_are_400(stack: Stack) -> None:
    flat = ROW.ravel().tolist()

    def infer(**changes: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": flat, **changes}]}

    cases: list[tuple[dict[str, Any], str]] = [
        (infer(shape=[2, 30]), "30 values do not fill shape [2, 30]"),
        (infer(data=["x"] * 30), "must hold float32 values, got strings"),
        (infer(datatype="FP16"), "must have datatype FP32, got 'FP16'"),
        (infer(parameters={"shared_memory_region": "r0"}), "shared memory"),
        (infer(parameters={"binary_data_size": {"n": 1}}), "must be a boolean, a number or a short string"),
        (infer(parameters=[1]), "'parameters' must be an object"),
        ({**infer(), "parameters": {"sequence_id": 7}}, "sequences"),
        ({**infer(), "parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or false"),
        ({**infer(), "outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, "binary_data must be true"),
        ({**infer(), "outputs": [{"name": "label", "shape": [1]}]}, "outputs[0] has unknown fields"),
        ({**infer(), "outputs": [{"name": "label"}, {"name": "label"}]}, "more than once"),
    ]
    with stack.client() as http:
        for body, says in cases:
            _error(http.post(INFER, json=body), 400, says)
        # Parameters the protocol allows and Bastion does not act on are accepted, as Triton does.
        r = http.post(INFER, json={**infer(parameters={"note": "x"}), "parameters": {"priority": 1, "timeout": 5}})
        assert r.status_code == 200, r.text


def test_binary_data_output_returns_every_output_after_the_json_header(stack: Stack) -> None:
    x, _ = breast_cancer()
    labels, probas = _reference(x[:3])
    body, headers = _framed([_binary_input(x[:3])], parameters={"binary_data_output": True})
    with stack.client() as http:
        r = http.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    size = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:size])
    offset = size
    got = {}
    for output in head["outputs"]:
        n = output["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP32": "<f4"}[output["datatype"]]
        got[output["name"]] = np.frombuffer(r.content[offset : offset + n], dtype).reshape(output["shape"])
        offset += n
    assert offset == len(r.content)
    np.testing.assert_array_equal(got["label"], labels)
    np.testing.assert_allclose(got["probabilities"], probas, atol=1e-6, rtol=0)


# the media types ---------------------------------------------------------------------------
def test_json_without_a_content_type_is_accepted_and_other_types_are_415(stack: Stack) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]})
    with stack.client() as http:
        bare = http.post(INFER, content=body.encode())
        assert "content-type" not in bare.request.headers
        assert bare.status_code == 200 and bare.headers["content-type"] == "application/json", bare.text
        typed = http.post(INFER, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert typed.status_code == 200, typed.text
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
            r = http.post(INFER, content=body, headers={"Content-Type": content_type})
            _error(r, 415, "the body must be JSON")
        framed, headers = _framed([_binary_input(ROW)])
        octets = http.post(INFER, content=framed, headers={**headers, "Content-Type": "application/octet-stream"})
        assert octets.status_code == 200, octets.text
        _error(http.post(INFER, content=framed, headers={**headers, "Content-Type": "text/csv"}), 415, "binary")


# errors on every /v2 route ------------------------------------------------------------------
def test_versions_no_version_no_traffic_and_forbidden_look_as_they_should(stack: Stack) -> None:
    """An unknown version and one that takes no traffic (a shadow, an undeployed one) answer alike:
    no oracle of what exists; a version policy keeps from the caller answers the same (no oracle of
    the versions other tenants reach)."""
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]}
    with stack.client("globex") as globex, stack.client() as acme:
        for path in ("", "/ready"):
            texts = {}
            for version in ("3", "4", "99"):
                r = acme.get(f"/v2/models/{MODEL}/versions/{version}{path}")
                texts[version] = _error(r, 404, f"has no version {version} taking traffic").replace(version, "N")
            assert len(set(texts.values())) == 1, texts
            forbidden = _error(globex.get(f"/v2/models/{MODEL}/versions/2{path}"), 404, "has no version 2")
            assert forbidden.replace("2", "N") == texts["99"].replace("2", "N"), (forbidden, texts)
            _error(acme.get(f"/v2/models/{MODEL}/versions/x1{path}"), 400, "a model version is a positive integer")
            _error(acme.get(f"/v2/models/{MODEL}/versions/0{path}"), 400, "a model version is a positive integer")
            _error(acme.get(f"/v2/models/no-such-model/versions/1{path}"), 404, "no model 'no-such-model'")
        for version, status, says in (
            ("99", 404, "has no version 99"),
            ("4", 404, "has no version 4"),
            ("3", 404, "has no version 3"),
            ("9" * 30, 400, "positive integer"),
        ):
            _error(acme.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=body), status, says)
        _error(globex.post(f"/v2/models/{MODEL}/versions/2/infer", json=body), 404, "has no version 2 taking traffic")
        ok = acme.post(f"/v2/models/{MODEL}/versions/2/infer", json=body)
        assert (
            ok.status_code == 200 and ok.json()["model_version"] == "2" and ok.headers["x-bastion-model-version"] == "2"
        )


def test_every_v2_route_answers_auth_scope_and_routing_errors_in_the_oip_shape(stack: Stack) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]}
    routes = [
        ("GET", f"/v2/models/{MODEL}"),
        ("GET", f"/v2/models/{MODEL}/ready"),
        ("GET", f"/v2/models/{MODEL}/versions/1"),
        ("GET", f"/v2/models/{MODEL}/versions/1/ready"),
        ("POST", INFER),
        ("POST", f"/v2/models/{MODEL}/versions/1/infer"),
    ]
    with httpx.Client(base_url=stack.gateway, timeout=30) as anonymous, stack.client("jobs-only") as jobs:
        for method, path in routes:
            r = anonymous.request(method, path, json=body if method == "POST" else None)
            _error(r, 401, "an API key or token is required")
            assert r.headers["www-authenticate"] == 'Bearer realm="bastion"'
            r = anonymous.request(method, path, headers={"Authorization": "Bearer bst_nope_nope"})
            _error(r, 401, "unknown")
            _error(jobs.request(method, path, json=body if method == "POST" else None), 403, "lacks the scope")
    with stack.client() as http:
        _error(http.get("/v2/models/no-such-model"), 404, "no model 'no-such-model' is being served")
        _error(http.get("/v2/models/no-such-model/ready"), 404, "no model")
        _error(http.post("/v2/models/no-such-model/infer", json=body), 404, "no model")
        _error(http.get("/v2/nothing-here"), 404, "no route GET /v2/nothing-here")
        _error(http.get(INFER), 405, "method not allowed")
        _error(http.post(INFER, content=b"\xff{"), 400, "not valid JSON")
        # /v1 keeps RFC 9457 problems.
        r = http.post("/v1/models/no-such-model/predict", json={"inputs": [[1.0] * 30]})
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_an_oversized_chunked_v2_body_is_413_in_the_oip_shape(stack: Stack) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ['
        for _ in range(2048):
            yield b"1.0," * 256

    with stack.client() as http:
        _error(http.post(INFER, content=chunks()), 413, "exceeds the limit")


def test_a_spent_budget_is_429_in_the_oip_shape_with_its_retry_headers(stack: Stack) -> None:
    """A budget of 1 unit, and requests of 20 rows (at least 0.2 units each, whatever the measured price)."""
    stack.admin.set_tenant("oip-thrifty", None, limits={"burst": 1, "units_per_s": 0.001})
    key = stack.admin.create_key("oip-thrifty", "thrifty")["key"]
    headers = {"Authorization": f"Bearer {key}"}
    wait_until(lambda: httpx.get(f"{stack.gateway}/v2/models/{MODEL}", headers=headers).status_code == 200, 10, "key")
    rows = np.ones((20, 30), np.float32)
    body = {"inputs": [{"name": "input", "shape": [20, 30], "datatype": "FP32", "data": rows.ravel().tolist()}]}
    with httpx.Client(base_url=stack.gateway, headers=headers, timeout=30) as http:
        answers = [http.post(INFER, json=body) for _ in range(6)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused, [(r.status_code, r.text[:100]) for r in answers]
    _error(refused[-1], 429, "tenant-model budget")
    assert int(refused[-1].headers["retry-after"]) >= 1
    assert refused[-1].headers["ratelimit-policy"].startswith('"tenant-model"')
    client = _client(stack)
    try:
        with pytest.raises(InferenceServerException) as limited:
            client.infer(MODEL, [_input(rows)], headers=headers)
        _server_said(limited.value, "429", "tenant-model budget")
    finally:
        client.close()


def test_the_stack_still_serves_after_the_abuse(stack: Stack) -> None:
    client = _client(stack)
    try:
        assert client.infer(MODEL, [_input(ROW)], headers=_auth(stack)).as_numpy("label").shape == (1,)
    finally:
        client.close()
    for name, proc in stack.procs.items():
        assert proc.poll() is None, f"{name} exited"


def test_refusals_made_before_any_route_take_the_oip_shape_under_v2(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A declared oversized body (the body-size limit) and a banned client (the abuse guard) are
    refused before routing: {"error": ...} under /v2, problems under /v1, status and headers alike."""
    guarded = {"trusted_proxies": "127.0.0.1", "abuse_tarpit_after": 2, "abuse_ban_after": 3, "abuse_tarpit_step_ms": 0}
    with running(tmp_path_factory.mktemp("oip-edge"), workers=0, **guarded) as s:
        huge = np.ones((10_000, 30), np.float32)  # 1.2 MB of binary data: over the 1 MiB limit
        client = _client(s)
        try:
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, [_input(huge)], headers=_auth(s))
            _server_said(refused.value, "413", "bytes; the limit is 1048576")
            assert refused.value.message().startswith("the body is "), refused.value
        finally:
            client.close()
        with s.client() as http:
            body = b"{" + b" " * (2 << 20) + b"}"
            _error(http.post(INFER, content=body), 413, f"the body is {len(body)} bytes")
            r = http.post(
                "/v1/models/breast-cancer/predict", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        banned = {"X-Forwarded-For": "203.0.113.77"}
        with httpx.Client(base_url=s.gateway, headers=banned, timeout=30) as anonymous:
            for _ in range(3):
                assert anonymous.get(f"/v2/models/{MODEL}").status_code == 401
            r = anonymous.get(f"/v2/models/{MODEL}")
            _error(r, 429, "this client is blocked")
            assert int(r.headers["retry-after"]) >= 1
            r = anonymous.post("/v1/models/breast-cancer/predict", json={})
            assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
