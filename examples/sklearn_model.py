"""Train a scikit-learn model and write it as ONNX for Bastion.

Run from the repository root:

    .venv/bin/python examples/sklearn_model.py [--out build/examples/iris.onnx]

It trains a standardised logistic regression on the iris data set (150 flowers, 4 measurements,
3 species), converts it with skl2onnx and writes, next to the ONNX file:

- ``iris.json``: a request body with two flowers, ready for ``curl -d @build/examples/iris.json``;
- ``iris.metadata.json``: what ``bastion models register --metadata`` adds to the version: the
  feature names and their ranges (requests outside them are refused with 400), the class names
  of the ``probabilities`` columns, an owner, a model card and the training data's lineage.

What makes an ONNX file servable: float (or int, bool) tensor inputs with a dynamic first
dimension (the rows), tensor outputs (``zipmap=False``: skl2onnx otherwise returns a list of
dictionaries, which ONNX Runtime cannot batch) and no external data. The script checks the
converted model with ONNX Runtime against scikit-learn's own predictions before writing it.
Needs the ``examples`` extra: ``.venv/bin/pip install -e '.[examples]'``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

MODEL = "iris"


def build(out: Path, c: float = 1.0) -> None:
    data = load_iris()
    x = data.data.astype(np.float32)
    y = data.target
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=0))
    model.fit(x, y)

    features = x.shape[1]
    onx = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, features]))],  # None: any number of rows
        options={id(model.steps[-1][1]): {"zipmap": False}},  # probabilities as one [N, 3] tensor
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "iris species classifier (4 float measurements in cm)"

    # The same rows through ONNX Runtime and scikit-learn must agree before the file is written.
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    assert (label == model.predict(x)).all(), "ONNX labels differ from scikit-learn's"
    assert np.allclose(probabilities, model.predict_proba(x), atol=1e-5), "ONNX probabilities differ"

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(onx.SerializeToString())
    request = out.with_suffix(".json")
    rows = [data.data[0].tolist(), data.data[100].tolist()]  # one setosa, one virginica
    request.write_text(json.dumps({"inputs": rows}) + "\n")
    metadata = out.with_suffix(".metadata.json")
    metadata.write_text(json.dumps(_metadata(data, x, model.score(x, y)), indent=2) + "\n")

    print(f"wrote {out} ({out.stat().st_size} bytes), training accuracy {model.score(x, y):.3f}")
    print(f'  input  "input": float32 [N, {features}] ({", ".join(data.feature_names)})')
    print('  output "label": int64 [N]; "probabilities": float32 [N, 3] (' + ", ".join(data.target_names) + ")")
    print(f"wrote {request} (a request body, 2 rows) and {metadata} (version metadata)")
    print()
    print("Next, with Bastion running (./run-bastion) and a key in $KEY:")
    print(f"  ./bastion models register {MODEL} {out} --metadata {metadata}")
    print(
        f'  curl -sf http://127.0.0.1:8000/v1/models/{MODEL}/predict -H "Authorization: Bearer $KEY" '
        f"-H 'Content-Type: application/json' -d @{request}"
    )


def _metadata(data: Any, x: np.ndarray, accuracy: float) -> dict[str, Any]:
    names = [n.removesuffix(" (cm)").replace(" ", "_") for n in data.feature_names]
    species = [str(t) for t in data.target_names]  # class index -> name, for label and probabilities
    return {
        "owner": "examples",
        "model_card": "Iris species from sepal and petal length and width (cm): a standardised logistic "
        "regression trained on the 150 flowers of Fisher's iris data set. Not for anything but a demo.",
        "lineage": {
            "dataset": "sklearn.datasets.load_iris",
            "digest": hashlib.sha256(x.tobytes()).hexdigest(),
        },
        "offline_metrics": {"train_accuracy": round(float(accuracy), 4)},
        "postprocessing": {"label_output": "label", "score_output": "probabilities"},
        "signature": {
            "inputs": {
                "input": {
                    # Measurements are lengths in cm: anything negative or over 20 cm is refused (400).
                    "features": [{"name": name, "min": 0.0, "max": 20.0} for name in names]
                }
            },
            "outputs": {output: {"labels": species} for output in ("label", "probabilities")},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/iris.onnx"), help="ONNX file to write")
    parser.add_argument(
        "--c", type=float, default=1.0, help="inverse regularisation strength (LogisticRegression's C): another model"
    )
    args = parser.parse_args()
    build(args.out, args.c)


if __name__ == "__main__":
    main()
