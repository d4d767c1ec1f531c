"""Uploads and the snapshot (issue 11, finding 6).

The ONNX check runs in a child process with resource limits, in an empty working directory, so a
protobuf bomb is a 422 and never grows the control plane; external tensor data is refused wherever
a tensor sits (node attributes, subgraphs, sparse initializers), with one fixed message whatever
the reference names; metadata is capped; only versions that take traffic are in the snapshot; and
idle gateways and workers poll the small ``snap:serial`` key instead of downloading the snapshot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import onnx
import orjson
import pytest
from onnx import TensorProto, helper

from bastion import demo
from bastion.artifacts import onnx_check
from bastion.artifacts.sandbox import UNCHECKABLE, SandboxedCheck
from bastion.constants import SNAPSHOT_SERIAL_KEY
from bastion.errors import InvalidArtifact
from tests.support import Stack, running, wait_until

CHECK_MEMORY_MB = 512
BOMB_BYTES = 32 << 20  # decodes to well over CHECK_MEMORY_MB (about 20x its size in process)


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def protobuf_bomb(size: int) -> bytes:
    """A ModelProto whose one initializer holds ``size`` packed zero varints in ``int64_data``:
    ``size`` bytes on the wire, eight times that (and more) once parsed."""
    tensor = _field(8, b"w") + _varint(2 << 3) + _varint(TensorProto.INT64) + _field(7, b"\x00" * size)
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = _field(1, node) + _field(5, tensor) + _field(2, b"g")
    return _varint(1 << 3) + _varint(8) + _field(7, graph) + _field(8, _field(1, b"") + _varint(2 << 3) + _varint(17))


def _external(name: str, location: str) -> TensorProto:
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


def _model(nodes: list[onnx.NodeProto], **graph: Any) -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    made = helper.make_graph(nodes, "g", [x], [y], **graph)
    return helper.make_model(made, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def constant_attribute(location: str) -> bytes:
    """The external reference sits in a ``Constant`` node's ``value`` attribute."""
    return _model(
        [
            helper.make_node("Constant", [], ["c"], value=_external("c", location)),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ]
    )


def if_branch_initializer(location: str) -> bytes:
    """The external reference is an initializer of an ``If`` node's subgraph."""
    out = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    branch = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["b"])], "branch", [], [out], initializer=[_external("w", location)]
    )
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    return _model(
        [
            helper.make_node("If", ["cond"], ["b"], then_branch=branch, else_branch=branch),
            helper.make_node("Add", ["x", "b"], ["y"]),
        ],
        initializer=[cond],
    )


def loop_body_constant(location: str) -> bytes:
    """The external reference is in a ``Constant`` node inside a ``Loop`` body."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Constant", [], ["k"], value=_external("k", location)),
            helper.make_node("Add", ["acc_in", "k"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [None, 2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [None, 2]),
        ],
    )
    trips = helper.make_tensor("n", TensorProto.INT64, [], [1])
    cond = helper.make_tensor("go", TensorProto.BOOL, [], [True])
    return _model([helper.make_node("Loop", ["n", "go", "x"], ["y"], body=body)], initializer=[trips, cond])


def sparse_initializer(location: str) -> bytes:
    """The external reference is the values of a sparse initializer."""
    indices = helper.make_tensor("s_idx", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(_external("s", location), indices, [2])
    return _model([helper.make_node("Add", ["x", "s"], ["y"])], sparse_initializer=[sparse])


HIDING_PLACES = [constant_attribute, if_branch_initializer, loop_body_constant, sparse_initializer]


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The control plane and Redis only, with the ONNX check bounded to 512 MiB."""
    with running(
        tmp_path_factory.mktemp("uploads"), workers=0, gateways=0, artifact_check_memory_mb=CHECK_MEMORY_MB
    ) as s:
        yield s


def _upload(stack: Stack, model: str, data: bytes, **params: str) -> httpx.Response:
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
        return http.post(
            f"/admin/v1/models/{model}/versions",
            content=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )


def _upload_form(stack: Stack, model: str, data: bytes, metadata: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
        return http.post(
            f"/admin/v1/models/{model}/versions",
            data={"metadata": orjson.dumps(metadata).decode()},
            files={"artifact": ("model.onnx", data, "application/octet-stream")},
            timeout=120,
        )


# --- the protobuf bomb ---------------------------------------------------------------------------
def test_a_protobuf_bomb_is_refused_422_and_the_control_plane_does_not_grow(control: Stack) -> None:
    pid = control.procs["control"].pid
    before = _kib(pid, "VmHWM")
    r = _upload(control, "bomb", protobuf_bomb(BOMB_BYTES))
    assert r.status_code == 422, r.text
    assert r.json()["detail"] in (UNCHECKABLE, "the artifact does not parse as an ONNX model"), r.text
    grown_mb = (_kib(pid, "VmHWM") - before) / 1024
    # Parsed in process (as before), this bomb took the control plane past 600 MB; now it holds
    # the upload's bytes and nothing decoded.
    assert grown_mb < 6 * BOMB_BYTES / (1 << 20), f"the control plane's peak RSS grew by {grown_mb:.0f} MB"
    assert control.procs["control"].poll() is None
    assert _upload(control, "bomb", demo.model_bytes()).status_code == 201, "the next upload is checked as usual"


def test_a_child_that_cannot_finish_within_its_bounds_is_a_422_not_a_500() -> None:
    with pytest.raises(InvalidArtifact) as tight:
        SandboxedCheck(memory_mb=256, timeout_s=60)(protobuf_bomb(BOMB_BYTES), 1 << 30)
    assert tight.value.detail in (UNCHECKABLE, "the artifact does not parse as an ONNX model")
    with pytest.raises(InvalidArtifact, match="within its memory/time bounds"):
        SandboxedCheck(memory_mb=2048, timeout_s=0.05)(demo.model_bytes(), 1 << 30)
    assert SandboxedCheck()(demo.model_bytes(), 1 << 30).inputs[0].name == "input"


def test_the_check_bounds_what_a_model_decodes_to() -> None:
    """Tensors whose declared shape decodes to far more than the upload limit are refused before any runtime."""
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1 << 30], raw_data=b"\0\0\0\0")
    data = _model([helper.make_node("Add", ["x", "w"], ["y"])], initializer=[huge])
    with pytest.raises(InvalidArtifact, match="decode to more than"):
        onnx_check.inspect(data, 1 << 20)


# --- external data -------------------------------------------------------------------------------
@pytest.mark.parametrize("hide", HIDING_PLACES, ids=lambda f: f.__name__)
def test_external_data_is_refused_wherever_a_tensor_sits(hide: Any) -> None:
    with pytest.raises(InvalidArtifact) as refused:
        onnx_check.inspect(hide("weights.bin"), 1 << 20)
    assert refused.value.detail == onnx_check.EXTERNAL_DATA


def test_uploads_with_external_data_are_422_with_the_same_text_whether_the_file_exists_or_not(control: Stack) -> None:
    cwd = Path(os.readlink(f"/proc/{control.procs['control'].pid}/cwd"))
    existing = next(p.name for p in sorted(cwd.iterdir()) if p.is_file())
    answers = set()
    for hide in HIDING_PLACES:
        for location in (existing, "no-such-file-here.bin", "/etc/passwd", "/no/such/file"):
            r = _upload(control, "external", hide(location))
            assert r.status_code == 422, (hide.__name__, location, r.text)
            answers.add(r.json()["detail"])
    assert answers == {onnx_check.EXTERNAL_DATA}


# --- metadata ------------------------------------------------------------------------------------
def test_metadata_over_max_metadata_bytes_is_refused_naming_the_field_and_the_limit(control: Stack) -> None:
    limit = control.settings.max_metadata_bytes
    card = {"model_card": "x" * (limit + 1)}
    r = _upload_form(control, "meta", demo.model_bytes(), card)
    assert r.status_code == 413, r.text
    assert "model_card" in r.json()["detail"] and str(limit) in r.json()["detail"]
    labels = {"signature": {"outputs": {"probabilities": {"labels": ["l" * 200] * 1000}}}}
    r = _upload_form(control, "meta", demo.model_bytes(), labels)
    assert r.status_code == 413, r.text
    assert "signature" in r.json()["detail"] and str(limit) in r.json()["detail"]
    one_long = {"signature": {"outputs": {"probabilities": {"labels": ["a", "b" * 1000]}}}}
    r = _upload_form(control, "meta", demo.model_bytes(), one_long)
    assert r.status_code == 400 and "labels" in r.json()["detail"], r.text


# --- the snapshot --------------------------------------------------------------------------------
def test_only_versions_that_take_traffic_are_in_the_snapshot(control: Stack) -> None:
    labels = {"signature": {"outputs": {"probabilities": {"labels": ["benign" * 8, "malignant" * 8]}}}}
    admin = control.admin
    routed = admin.register("traffic", demo.model_bytes())["version"]
    idle = admin.register("traffic", demo.model_bytes(), activate=False, metadata=labels)["version"]
    models = orjson.loads(control.published_snapshot())["models"]
    assert set(models["traffic"]["versions"]) == {str(routed)}, "a registered, unrouted version is not published"
    admin.deploy(
        "traffic",
        [{"version": routed, "weight": 90, "role": "primary"}, {"version": idle, "weight": 10, "role": "canary"}],
    )
    models = orjson.loads(control.published_snapshot())["models"]
    assert set(models["traffic"]["versions"]) == {str(routed), str(idle)}, "a canary is published"


# --- idle readers poll the serial --------------------------------------------------------------
@pytest.fixture(scope="module")
def idle_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("idle"), workers=1, gateways=1, snapshot_refresh_s=0.5) as s:
        yield s


def _commands(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def test_idle_gateways_and_workers_poll_the_serial_and_never_re_download_the_snapshot(idle_stack: Stack) -> None:
    stack = idle_stack
    labels = {"signature": {"outputs": {"probabilities": {"labels": ["c" * 250] * 200}}}}
    routes = []
    for _ in range(4):  # a big (but capped) snapshot: four routed versions with ~50 KB of labels each
        v = stack.admin.register("big", demo.model_bytes(), activate=False, metadata=labels)["version"]
        routes.append({"version": v, "weight": 1, "role": "primary" if not routes else "canary"})
    stack.admin.deploy("big", routes)
    size = len(stack.published_snapshot())
    assert size > 150_000
    client = stack.redis_client()
    try:
        serial = int(client.get(SNAPSHOT_SERIAL_KEY) or 0)
        assert serial == int(orjson.loads(stack.published_snapshot())["serial"]), "snap:serial names snap:current"
        period = stack.settings.snapshot_refresh_s

        def settled() -> bool:  # every reader has loaded the newest snapshot: no big transfer in a period
            before = int(client.info("stats")["total_net_output_bytes"])
            time.sleep(2 * period)
            return int(client.info("stats")["total_net_output_bytes"]) - before < size / 4

        wait_until(settled, 30, "the readers to hold the newest snapshot")
        calls, out = _commands(client), int(client.info("stats")["total_net_output_bytes"])
        time.sleep(6 * stack.settings.snapshot_refresh_s)
        calls_after, out_after = _commands(client), int(client.info("stats")["total_net_output_bytes"])
    finally:
        client.close()
    polls = calls_after.get("get", 0) - calls.get("get", 0)
    assert polls >= 4, "readers poll snap:serial each refresh period"
    sent = out_after - out
    # Before: each of the two readers fetched the whole snapshot every period (12 x size here).
    assert sent < size / 2, f"Redis sent {sent} bytes to idle readers; the snapshot is {size}"


def test_a_missing_serial_key_makes_readers_fetch_and_the_control_plane_restores_it(idle_stack: Stack) -> None:
    stack = idle_stack
    client = stack.redis_client()
    try:
        client.delete(SNAPSHOT_SERIAL_KEY)  # as on a Redis written before the key existed
        wait_until(lambda: client.exists(SNAPSHOT_SERIAL_KEY) == 1, 15, "the control plane to write snap:serial")
        assert int(client.get(SNAPSHOT_SERIAL_KEY) or 0) == int(orjson.loads(stack.published_snapshot())["serial"])
    finally:
        client.close()
    with stack.client() as http:
        assert http.post("/v1/models/big/predict", json={"inputs": [[1.0] * 30]}).status_code == 200
