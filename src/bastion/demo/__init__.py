"""The bundled demo model: a breast-cancer classifier (30 float features), a sample request, and
the metadata it is registered with (feature and class names, the score output, and its training
data as the reference sample that drift is judged against).

Rebuild both with ``scripts/build_demo_model.py``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

MODEL_NAME = "breast-cancer"


def model_bytes() -> bytes:
    return resources.files("bastion.demo").joinpath("breast_cancer.onnx").read_bytes()


def sample_request() -> str:
    return resources.files("bastion.demo").joinpath("sample.json").read_text().strip()


def metadata() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(resources.files("bastion.demo").joinpath("metadata.json").read_text())
    return found
