"""The scripts in ``examples/`` build ONNX files that Bastion serves: each registers on a real stack
and answers its own request body with what ONNX Runtime, run here on the same input, answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.support import Stack

ROOT = Path(__file__).resolve().parent.parent


def run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"examples/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def local_outputs(model: bytes, body: dict[str, Any]) -> dict[str, np.ndarray]:
    """ONNX Runtime's outputs for a ``/v1`` request body, run in this process."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    given = body["inputs"] if isinstance(body["inputs"], dict) else {inputs[0].name: body["inputs"]}
    kinds = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}
    feed = {i.name: np.asarray(given[i.name], dtype=kinds.get(i.type, np.float32)) for i in inputs}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def assert_served_like_onnxruntime(stack: Stack, name: str, model: bytes, body: dict[str, Any]) -> dict[str, Any]:
    with stack.client() as client:
        r = client.post(f"/v1/models/{name}/predict", json=body)
    assert r.status_code == 200, r.text
    served = r.json()
    assert served["model"] == name
    want = local_outputs(model, body)
    assert set(served["outputs"]) == set(want)
    for output, value in want.items():
        got = np.asarray(served["outputs"][output])
        assert got.shape == value.shape, output
        if value.dtype.kind == "f":
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=output)
        else:
            np.testing.assert_array_equal(got, value, err_msg=output)
    return dict(served)


def test_the_scikit_learn_example_is_served_with_its_metadata(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "iris.onnx"
    result = run_example("sklearn_model.py", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"./bastion models register iris {out} --metadata" in result.stdout  # what to run next
    model = out.read_bytes()
    metadata = json.loads(out.with_suffix(".metadata.json").read_text())
    version = stack.admin.register("iris", model, metadata=metadata)
    assert [s["shape"] for s in version["signature"]["inputs"]] == [[None, 4]]
    assert version["signature"]["outputs"][1]["labels"] == ["setosa", "versicolor", "virginica"]
    body = json.loads(out.with_suffix(".json").read_text())
    served = assert_served_like_onnxruntime(stack, "iris", model, body)
    assert served["outputs"]["label"] == [0, 2]  # the body's setosa and virginica
    with stack.client() as client:  # the declared ranges hold at the gateway
        r = client.post("/v1/models/iris/predict", json={"inputs": [[50.0, 3.5, 1.4, 0.2]]})
    assert r.status_code == 400 and "sepal_length" in r.json()["detail"]


def test_the_pytorch_example_is_served_with_a_dynamic_batch(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "churn.onnx"
    result = run_example("pytorch_model.py", "--out", str(out), "--steps", "50")
    assert result.returncode == 0, result.stderr
    model = out.read_bytes()
    graph = onnx.load_model_from_string(model).graph
    assert [i.name for i in graph.input] == ["features"]
    assert [o.name for o in graph.output] == ["probabilities", "label"]
    stack.admin.register("churn", model)
    body = json.loads(out.with_suffix(".json").read_text())
    assert_served_like_onnxruntime(stack, "churn", model, body)
    rows = np.random.default_rng(3).normal(size=(7, 8)).round(3).tolist()  # a batch size the export never saw
    served = assert_served_like_onnxruntime(stack, "churn", model, {"inputs": rows})
    assert np.allclose(np.asarray(served["outputs"]["probabilities"]).sum(axis=1), 1.0, atol=1e-5)


def test_the_onnx_file_example_writes_a_body_the_model_answers(stack: Stack, tmp_path: Path) -> None:
    """Given an existing file (the demo model), its request body predicts as ONNX Runtime does."""
    body_file = tmp_path / "body.json"
    demo = ROOT / "src" / "bastion" / "demo" / "breast_cancer.onnx"
    result = run_example("onnx_file.py", str(demo), "--request", str(body_file), "--rows", "3", "--name", "copy")
    assert result.returncode == 0, result.stderr
    assert "Bastion: accepted" in result.stdout and "[N, 30]" in result.stdout
    assert "./bastion models register copy" in result.stdout
    body = json.loads(body_file.read_text())
    assert np.asarray(body["inputs"]).shape == (3, 30)
    stack.admin.register("copy", demo.read_bytes())
    assert_served_like_onnxruntime(stack, "copy", demo.read_bytes(), body)


def test_the_onnx_file_example_names_what_bastion_refuses(tmp_path: Path) -> None:
    """A model whose weights live in an external data file: refused, with the upload check's reason."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = tmp_path / "external.onnx"
    onnx.save_model(model, target, save_as_external_data=True, location="external.data", size_threshold=0)
    assert (tmp_path / "external.data").exists()
    result = run_example("onnx_file.py", str(target))
    assert result.returncode == 1
    assert "Bastion: refused: the artifact references external tensor data" in result.stdout


@pytest.mark.parametrize("script", ["sklearn_model.py", "pytorch_model.py", "onnx_file.py"])
def test_every_example_documents_how_to_run_it(script: str) -> None:
    result = run_example(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout
    assert f".venv/bin/python examples/{script}" in (ROOT / "examples" / script).read_text()
