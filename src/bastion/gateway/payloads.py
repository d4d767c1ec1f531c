"""Request bodies in, response bodies out: Bastion's v1 format and the Open Inference Protocol v2.

v1:  ``{"inputs": [[...], ...]}`` for a single-input model, or ``{"inputs": {"name": [...]}}``
v2:  ``{"id": ..., "inputs": [{"name", "shape", "datatype", "data"}], "outputs": [{"name"}]}``
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.errors import InvalidInput
from bastion.signature import NUMPY_TO_V2, V2_TO_NUMPY, Signature, to_tensor

_V1_FIELDS = frozenset({"inputs"})
_V2_FIELDS = frozenset({"id", "inputs", "outputs", "parameters"})
_V2_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "data", "parameters"})


def _object(doc: Any, allowed: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidInput(f"{what} has unknown fields {unknown[:5]}; allowed: {sorted(allowed)}")
    return doc


def v1_inputs(doc: Any, signature: Signature, max_rows: int) -> dict[str, np.ndarray]:
    doc = _object(doc, _V1_FIELDS, "the body")
    if "inputs" not in doc:
        raise InvalidInput("the body is missing the required field 'inputs'")
    inputs = doc["inputs"]
    if isinstance(inputs, list):
        if len(signature.inputs) != 1:
            raise InvalidInput(f"this model takes named inputs {[s.name for s in signature.inputs]}; send an object")
        spec = signature.inputs[0]
        return {spec.name: to_tensor(spec, inputs, max_rows)}
    if not isinstance(inputs, dict):
        raise InvalidInput("'inputs' must be an array of rows or an object of named arrays")
    missing = [s.name for s in signature.inputs if s.name not in inputs]
    if missing:
        raise InvalidInput(f"'inputs' is missing {missing}")
    extra = sorted(set(inputs) - {s.name for s in signature.inputs})
    if extra:
        raise InvalidInput(f"'inputs' has unknown inputs {extra[:5]}")
    tensors = {s.name: to_tensor(s, inputs[s.name], max_rows) for s in signature.inputs}
    _same_rows(tensors)
    return tensors


def v2_inputs(doc: Any, signature: Signature, max_rows: int) -> tuple[dict[str, np.ndarray], list[str] | None, Any]:
    """The tensors, the requested output names (None: all) and the request id."""
    doc = _object(doc, _V2_FIELDS, "the body")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
        raise InvalidInput("'id' must be a string of at most 128 characters")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise InvalidInput("the body must have a non-empty 'inputs' array")
    tensors: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        name, tensor = _v2_tensor(index, item, signature, max_rows)
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        tensors[name] = tensor
    missing = [s.name for s in signature.inputs if s.name not in tensors]
    if missing:
        raise InvalidInput(f"'inputs' is missing {missing}")
    _same_rows(tensors)
    return tensors, _v2_wanted(doc.get("outputs"), signature), request_id


def _v2_tensor(index: int, item: Any, signature: Signature, max_rows: int) -> tuple[str, np.ndarray]:
    item = _object(item, _V2_INPUT_FIELDS, f"inputs[{index}]")
    for field in ("name", "shape", "datatype", "data"):
        if field not in item:
            raise InvalidInput(f"inputs[{index}] is missing the required field {field!r}")
    name = item["name"]
    if not isinstance(name, str):
        raise InvalidInput(f"inputs[{index}].name must be a string")
    spec = signature.input(name)
    expected = NUMPY_TO_V2.get(spec.dtype)
    if item["datatype"] != expected:
        raise InvalidInput(f"input {name!r} must have datatype {expected}, got {str(item['datatype'])[:20]!r}")
    shape = item["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape)
    ):
        raise InvalidInput(f"inputs[{index}].shape must be a list of at most 8 non-negative integers")
    return name, to_tensor(spec, item["data"], max_rows, flat_shape=shape)


def _v2_wanted(outputs: Any, signature: Signature) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    known = {o.name for o in signature.outputs}
    wanted = [o["name"] for o in outputs]
    if len(set(wanted)) != len(wanted):
        raise InvalidInput("'outputs' names an output more than once")
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown[:5]}; the model has {sorted(known)}")
    return wanted


def _same_rows(tensors: dict[str, np.ndarray]) -> None:
    rows = {len(t) for t in tensors.values() if t.ndim}
    if len(rows) > 1:
        raise InvalidInput(f"all inputs must have the same number of rows, got {sorted(rows)}")


def v1_outputs(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: value.tolist() for name, value in outputs.items()}


def v1_response_outputs(outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Outputs for a response body: arrays serialise natively; a 0-d array becomes a number."""
    return {name: value.item() if value.ndim == 0 else value for name, value in outputs.items()}


def v2_outputs(outputs: dict[str, np.ndarray], wanted: list[str] | None) -> list[dict[str, Any]]:
    names = wanted if wanted is not None else list(outputs)
    return [
        {
            "name": name,
            "datatype": NUMPY_TO_V2.get(outputs[name].dtype.name, "BYTES"),
            "shape": list(outputs[name].shape),
            "data": outputs[name].reshape(-1).tolist(),
        }
        for name in names
    ]


def v2_tensor_metadata(signature: Signature, which: str) -> list[dict[str, Any]]:
    specs = signature.inputs if which == "inputs" else signature.outputs
    return [
        {
            "name": s.name,
            "datatype": NUMPY_TO_V2.get(s.dtype, "BYTES"),
            "shape": [-1 if d is None else d for d in s.shape],
        }
        for s in specs
    ]


__all__ = ["V2_TO_NUMPY", "v1_inputs", "v1_outputs", "v2_inputs", "v2_outputs"]
