"""The bundled demo model: a breast-cancer classifier (30 float features) and a sample request.

Rebuild both with ``scripts/build_demo_model.py``.
"""

from __future__ import annotations

from importlib import resources

MODEL_NAME = "breast-cancer"


def model_bytes() -> bytes:
    return resources.files("bastion.demo").joinpath("breast_cancer.onnx").read_bytes()


def sample_request() -> str:
    return resources.files("bastion.demo").joinpath("sample.json").read_text().strip()
