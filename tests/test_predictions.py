"""Predictions over real HTTP equal in-process onnxruntime outputs, for every demo row."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from bastion import demo
from tests.support import Stack, breast_cancer


def _reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(demo.model_bytes(), providers=["CPUExecutionProvider"])
    label, proba = session.run(None, {"input": x})
    return label, proba


def test_v1_predict_matches_onnxruntime_for_all_569_rows(stack: Stack) -> None:
    """Each row sent alone through /v1/.../predict gives the in-process label and probabilities."""
    x, _ = breast_cancer()
    labels, probas = _reference(x)
    assert len(x) == 569
    with stack.client() as http:
        for i, row in enumerate(x):
            r = http.post("/v1/models/breast-cancer/predict", json={"inputs": [row.tolist()]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["outputs"]["label"] == [int(labels[i])]
            np.testing.assert_allclose(body["outputs"]["probabilities"][0], probas[i], atol=1e-6, rtol=0)
            assert r.headers["x-bastion-model-version"] == str(body["version"])


def test_v2_infer_matches_onnxruntime_for_all_569_rows(stack: Stack) -> None:
    """Open Inference Protocol requests (flat data, batches of 50) give the in-process outputs."""
    x, _ = breast_cancer()
    labels, probas = _reference(x)
    got_labels: list[int] = []
    got_probas: list[float] = []
    with stack.client() as http:
        for start in range(0, len(x), 50):
            chunk = x[start : start + 50]
            r = http.post(
                "/v2/models/breast-cancer/infer",
                json={
                    "id": f"chunk-{start}",
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(chunk.shape),
                            "datatype": "FP32",
                            "data": chunk.ravel().tolist(),
                        }
                    ],
                },
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == f"chunk-{start}"
            assert body["model_name"] == "breast-cancer"
            outputs = {o["name"]: o for o in body["outputs"]}
            assert outputs["label"]["datatype"] == "INT64"
            assert outputs["probabilities"]["shape"] == [len(chunk), 2]
            got_labels += outputs["label"]["data"]
            got_probas += outputs["probabilities"]["data"]
    assert got_labels == labels.tolist()
    np.testing.assert_allclose(np.array(got_probas).reshape(-1, 2), probas, atol=1e-6, rtol=0)


def test_v1_batch_of_rows_and_named_inputs(stack: Stack) -> None:
    """A multi-row request and the named-input form give the same outputs."""
    x, _ = breast_cancer()
    labels, _ = _reference(x[:10])
    with stack.client() as http:
        rows = http.post("/v1/models/breast-cancer/predict", json={"inputs": x[:10].tolist()}).json()
        named = http.post("/v1/models/breast-cancer/predict", json={"inputs": {"input": x[:10].tolist()}}).json()
    assert rows["outputs"]["label"] == labels.tolist()
    assert named["outputs"] == rows["outputs"]


def test_v2_model_metadata_and_health(stack: Stack) -> None:
    """The v2 metadata, readiness and health routes answer as KServe/Triton clients expect."""
    with stack.client() as http:
        meta = http.get("/v2/models/breast-cancer").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
        assert http.get("/v2/models/breast-cancer/ready").status_code == 200
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").json()["ready"] is True


def test_metrics_are_exported(stack: Stack) -> None:
    """The gateway's Prometheus endpoint (its private metrics port) reports request latency after traffic."""
    with stack.client() as http:
        http.post("/v1/models/breast-cancer/predict", json={"inputs": [[1.0] * 30]})
    text = stack.gateway_metrics()
    assert "bastion_gateway_request_seconds_count" in text
    assert 'route="predict",status="200"' in text
