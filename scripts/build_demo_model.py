"""Rebuild the bundled demo model: a breast-cancer classifier exported to ONNX.

Run: .venv/bin/python scripts/build_demo_model.py
It trains a standardised logistic regression on scikit-learn's built-in breast-cancer
data (569 rows, 30 features) and writes ``src/bastion/demo/breast_cancer.onnx``, a sample
request, and the version metadata ``bastion up`` registers it with (``metadata.json``: feature
and class names, which output holds the scores, and the training data as the reference sample
that drift is judged against).
The output is deterministic for a given scikit-learn / skl2onnx version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

DEMO = Path(__file__).resolve().parent.parent / "src" / "bastion" / "demo"
OUT = DEMO / "breast_cancer.onnx"
SAMPLE = DEMO / "sample.json"
METADATA = DEMO / "metadata.json"


def main() -> None:
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    model.fit(x, y)
    onx = to_onnx(
        model,
        x[:1],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.input[0].name = "input"
    for node in onx.graph.node:
        node.input[:] = ["input" if name == "X" else name for name in node.input]
    onx.doc_string = "Bastion demo: breast-cancer classifier (30 float features, labels 0=malignant 1=benign)"
    OUT.write_bytes(onx.SerializeToString())
    SAMPLE.write_text(json.dumps({"inputs": [data.data[0].tolist()]}) + "\n")
    metadata = {
        "description": "demo breast-cancer classifier",
        "lineage": {"dataset": "sklearn.datasets.load_breast_cancer", "version": "UCI WDBC"},
        "postprocessing": {"label_output": "label", "score_output": "probabilities", "positive_label": 1},
        "signature": {
            "inputs": {"input": {"features": [{"name": str(n)} for n in data.feature_names]}},
            "outputs": {"label": {"labels": [str(n) for n in data.target_names]}},
        },
        "reference_sample": {"input": data.data.tolist()},
    }
    METADATA.write_text(json.dumps(metadata, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes), train accuracy {model.score(x, y):.4f}")


if __name__ == "__main__":
    main()
