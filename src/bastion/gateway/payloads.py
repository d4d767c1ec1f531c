"""Request bodies in, response bodies out: Bastion's v1 format and the Open Inference Protocol v2.

v1:  ``{"inputs": [[...], ...]}`` for a single-input model, or ``{"inputs": {"name": [...]}}``
v2:  ``{"id": ..., "inputs": [{"name", "shape", "datatype", "data", "parameters"}],
"outputs": [{"name", "parameters"}], "parameters": {...}}``: the JSON of the Open Inference
Protocol; the binary tensor data extension's framing is ``gateway.oip``'s, which hands each
binary input's bytes here (``v2_request(..., raw=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.errors import InvalidInput
from bastion.signature import NUMPY_TO_V2, V2_TO_NUMPY, Signature, from_raw, to_tensor

_V1_FIELDS = frozenset({"inputs"})
_V2_FIELDS = frozenset({"id", "inputs", "outputs", "parameters"})
_V2_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "data", "parameters"})
_V2_OUTPUT_FIELDS = frozenset({"name", "parameters"})
MAX_PARAMETERS = 64


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


@dataclass(frozen=True, slots=True)
class V2Request:
    """An OIP v2 inference request, validated: its tensors, the outputs asked for (None: all the
    model's, each ``binary_default``) with whether each goes back as binary data, and its id."""

    tensors: dict[str, np.ndarray]
    outputs: tuple[tuple[str, bool], ...] | None
    binary_default: bool
    request_id: str | None

    def answer(self, produced: dict[str, np.ndarray]) -> list[tuple[str, bool]]:
        """The outputs to answer with, in order, each with whether it goes back as binary data."""
        if self.outputs is None:
            return [(name, self.binary_default) for name in produced]
        return list(self.outputs)


def v2_inputs(doc: Any, signature: Signature, max_rows: int) -> tuple[dict[str, np.ndarray], list[str] | None, Any]:
    """The tensors, the requested output names (None: all) and the request id of a JSON request."""
    request = v2_request(doc, signature, max_rows)
    wanted = None if request.outputs is None else [name for name, _ in request.outputs]
    return request.tensors, wanted, request.request_id


def v2_request(doc: Any, signature: Signature, max_rows: int, raw: Sequence[bytes | None] | None = None) -> V2Request:
    """Validate an OIP v2 inference request against ``signature``. ``raw`` holds, by position in
    ``inputs``, the binary data of each input sent with the binary tensor extension (None for one
    sent as JSON ``data``; ``raw`` None: the request used no binary extension)."""
    doc = _object(doc, _V2_FIELDS, "the body")
    params = _parameters(doc.get("parameters"), "the request")
    sequence = params.get("sequence_id")
    if sequence not in (None, 0, ""):
        raise InvalidInput("sequences (parameters.sequence_id) are not supported: this model is stateless")
    binary_default = _flag(params, "binary_data_output", "the request")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 128):
        raise InvalidInput("'id' must be a string of at most 128 characters")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise InvalidInput("the body must have a non-empty 'inputs' array")
    tensors: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        data = raw[index] if raw is not None and index < len(raw) else None
        name, tensor = _v2_tensor(index, item, signature, max_rows, data)
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        tensors[name] = tensor
    missing = [s.name for s in signature.inputs if s.name not in tensors]
    if missing:
        raise InvalidInput(f"'inputs' is missing {missing}")
    _same_rows(tensors)
    outputs = _v2_requested(doc.get("outputs"), signature, binary_default)
    return V2Request(tensors, outputs, binary_default, request_id)


def _v2_tensor(index: int, item: Any, signature: Signature, max_rows: int, raw: bytes | None) -> tuple[str, np.ndarray]:
    item = _object(item, _V2_INPUT_FIELDS, f"inputs[{index}]")
    for field in ("name", "shape", "datatype"):
        if field not in item:
            raise InvalidInput(f"inputs[{index}] is missing the required field {field!r}")
    name = item["name"]
    if not isinstance(name, str):
        raise InvalidInput(f"inputs[{index}].name must be a string")
    params = _parameters(item.get("parameters"), f"input {name[:64]!r}")
    _no_shared_memory(params, f"input {name[:64]!r}")
    if raw is None and "binary_data_size" in params:
        raise InvalidInput(
            f"input {name[:64]!r} has parameters.binary_data_size but the request carries no binary data: "
            "send the Inference-Header-Content-Length header with the JSON header's length"
        )
    if raw is not None and "data" in item:
        raise InvalidInput(f"input {name[:64]!r} has both 'data' and binary data (parameters.binary_data_size)")
    if raw is None and "data" not in item:
        raise InvalidInput(f"inputs[{index}] is missing the required field 'data'")
    spec = signature.input(name)
    expected = NUMPY_TO_V2.get(spec.dtype)
    datatype = item["datatype"]
    if datatype == "BYTES" and expected != "BYTES":
        raise InvalidInput(f"input {name!r} must have datatype {expected}: this model takes no BYTES (string) tensors")
    if datatype != expected:
        raise InvalidInput(f"input {name!r} must have datatype {expected}, got {str(datatype)[:20]!r}")
    shape = item["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape)
    ):
        raise InvalidInput(f"inputs[{index}].shape must be a list of at most 8 non-negative integers")
    if raw is not None:
        return name, from_raw(spec, datatype, shape, raw, max_rows)
    return name, to_tensor(spec, item["data"], max_rows, flat_shape=shape)


def _v2_requested(outputs: Any, signature: Signature, binary_default: bool) -> tuple[tuple[str, bool], ...] | None:
    """The outputs asked for, each with whether it goes back as binary data (None: all)."""
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    known = {o.name for o in signature.outputs}
    wanted: list[tuple[str, bool]] = []
    for index, item in enumerate(outputs):
        item = _object(item, _V2_OUTPUT_FIELDS, f"outputs[{index}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        where = f"output {name[:64]!r}"
        params = _parameters(item.get("parameters"), where)
        if "classification" in params:
            raise InvalidInput(f"{where}: the classification extension (parameters.classification) is not supported")
        _no_shared_memory(params, where)
        wanted.append((name, _flag(params, "binary_data", where, binary_default)))
    names = [name for name, _ in wanted]
    if len(set(names)) != len(names):
        raise InvalidInput("'outputs' names an output more than once")
    unknown = sorted(set(names) - known)
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown[:5]}; the model has {sorted(known)}")
    return tuple(wanted)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """An OIP ``parameters`` object: at most ``MAX_PARAMETERS`` names, each a bool, number or
    string (the protocol's ``$parameter``). Names Bastion does not know are ignored, as Triton does."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    if len(value) > MAX_PARAMETERS:
        raise InvalidInput(f"{where}: 'parameters' has more than {MAX_PARAMETERS} entries")
    for key, item in value.items():
        if len(key) > 128:
            raise InvalidInput(f"{where}: a parameter name is longer than 128 characters")
        if not isinstance(item, bool | int | float | str) or (isinstance(item, str) and len(item) > 1024):
            raise InvalidInput(f"{where}: parameter {key[:64]!r} must be a boolean, a number or a short string")
    return value


def _flag(params: dict[str, Any], name: str, where: str, default: bool = False) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: parameters.{name} must be true or false")
    return value


def _no_shared_memory(params: dict[str, Any], where: str) -> None:
    if any(key.startswith("shared_memory") for key in params):
        raise InvalidInput(f"{where}: shared memory (parameters.shared_memory_region) is not supported")


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
    return [v2_output(name, outputs[name]) for name in names]


def v2_output(name: str, value: np.ndarray) -> dict[str, Any]:
    """One output tensor as OIP JSON: flat ``data`` in row-major order."""
    return {
        "name": name,
        "datatype": NUMPY_TO_V2.get(value.dtype.name, "BYTES"),
        "shape": list(value.shape),
        "data": value.reshape(-1).tolist(),
    }


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


__all__ = ["V2_TO_NUMPY", "V2Request", "v1_inputs", "v1_outputs", "v2_inputs", "v2_output", "v2_outputs", "v2_request"]
