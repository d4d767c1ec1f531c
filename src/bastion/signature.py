"""Model signatures and the validation of request tensors against them.

A signature lists a model's input and output tensors: name, element type and shape, where
``None`` marks a dynamic dimension (the first one is the batch). The gateway validates every
request against it before anything is queued: shape, element type, finite numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.errors import InvalidInput

# Open Inference Protocol datatype <-> numpy dtype name.
V2_TO_NUMPY = {
    "BOOL": "bool",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}

_ACCEPTED_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


@dataclass(frozen=True, slots=True)
class Feature:
    """One column of a rank-2 input, as the uploader refined it: a name and the values allowed."""

    name: str
    min: float | None = None
    max: float | None = None
    categories: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for key in ("min", "max"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.categories is not None:
            out["categories"] = list(self.categories)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Feature:
        cats = data.get("categories")
        return cls(str(data["name"]), data.get("min"), data.get("max"), tuple(cats) if cats is not None else None)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]
    features: tuple[Feature, ...] = ()  # inputs: one per column, when the uploader named them
    labels: tuple[str, ...] = ()  # outputs: class names by index, when the uploader gave them
    # the features' ranges as arrays, worked out once: None when no feature declares a range
    bounds: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(f.min is not None or f.max is not None for f in self.features):
            low = np.array([-np.inf if f.min is None else f.min for f in self.features])
            high = np.array([np.inf if f.max is None else f.max for f in self.features])
            object.__setattr__(self, "bounds", (low, high))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.features:
            out["features"] = [f.to_dict() for f in self.features]
        if self.labels:
            out["labels"] = list(self.labels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            str(data["name"]),
            str(data["dtype"]),
            tuple(data["shape"]),
            tuple(Feature.from_dict(f) for f in data.get("features") or ()),
            tuple(str(label) for label in data.get("labels") or ()),
        )


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rows_independent: bool = True  # the uploader's word: no output depends on other rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "rows_independent": self.rows_independent,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Signature:
        return cls(
            tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            bool(data.get("rows_independent", True)),
        )

    @property
    def batchable(self) -> bool:
        """Rows of different requests may share one model call: the uploader did not say otherwise,
        and the shapes allow it (every input rank ≥ 2 with a dynamic row dimension, every output
        with a dynamic row dimension)."""
        return (
            self.rows_independent
            and all(len(s.shape) >= 2 and s.shape[0] is None for s in self.inputs)
            and all(len(s.shape) >= 1 and s.shape[0] is None for s in self.outputs)
        )

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise InvalidInput(f"unknown input {name[:64]!r}; the model takes {[s.name for s in self.inputs]}")


def to_tensor(spec: TensorSpec, data: Any, max_rows: int, flat_shape: list[int] | None = None) -> np.ndarray:
    """Turn JSON data into an array that matches ``spec``, or raise ``InvalidInput``.

    ``flat_shape`` is given for Open Inference Protocol requests, whose data may be flat.
    Values are never coerced across kinds: a string or a boolean is not a number.
    """
    if not isinstance(data, list):
        raise InvalidInput(f"input {spec.name!r} must be an array")
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"input {spec.name!r} is not a rectangular array of numbers") from exc
    if raw.dtype.kind not in _ACCEPTED_KINDS.get(np.dtype(spec.dtype).kind, ""):
        if raw.size == 0 and raw.dtype.kind == "f":
            pass
        else:
            raise InvalidInput(
                f"input {spec.name!r} must hold {spec.dtype} values, got {_describe_kind(raw.dtype.kind)}"
            )
    if np.dtype(spec.dtype).kind != "b" and raw.dtype.kind != "b" and _holds_bool(data):
        raise InvalidInput(f"input {spec.name!r} must hold {spec.dtype} values, got booleans")
    if flat_shape is not None:
        expected = math.prod(flat_shape)  # Python ints: no overflow
        if raw.size != expected:
            raise InvalidInput(f"input {spec.name!r}: {raw.size} values do not fill shape {flat_shape}")
        raw = raw.reshape(flat_shape)
    _check_shape(spec, raw.shape, max_rows)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = raw.astype(spec.dtype, copy=False)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"input {spec.name!r} holds a value that is not a finite {spec.dtype}")
    if arr.dtype.kind in "iu" and raw.dtype != arr.dtype and not np.array_equal(raw, arr):
        raise InvalidInput(f"input {spec.name!r} holds a value out of range for {spec.dtype}")
    if spec.features:
        _check_features(spec, arr)
    return arr


def from_raw(spec: TensorSpec, datatype: str, shape: list[int], raw: bytes, max_rows: int) -> np.ndarray:
    """Turn a raw little-endian tensor (the OIP binary extension, gRPC ``raw_input_contents``)
    into an array that matches ``spec``, with the same checks as JSON data: the datatype must be
    the model's own (no conversion), the byte count must fill ``shape`` exactly, the shape must fit,
    floats must be finite, declared feature ranges hold. Raise ``InvalidInput``."""
    expected = NUMPY_TO_V2.get(spec.dtype)
    if datatype != expected:
        raise InvalidInput(f"input {spec.name!r} must have datatype {expected}, got {str(datatype)[:20]!r}")
    if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 31 for d in shape):
        raise InvalidInput(f"input {spec.name!r}: the shape must be at most 8 non-negative integers")
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    count = math.prod(shape)  # Python ints: no overflow
    if count * dtype.itemsize != len(raw):
        raise InvalidInput(
            f"input {spec.name!r}: {len(raw)} bytes do not fill shape {shape} of {datatype} "
            f"({count * dtype.itemsize} bytes)"
        )
    _check_shape(spec, tuple(shape), max_rows)
    arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).astype(spec.dtype, copy=False)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInput(f"input {spec.name!r} holds a value that is not a finite {spec.dtype}")
    if arr.dtype.kind == "b" and raw and max(raw) > 1:
        raise InvalidInput(f"input {spec.name!r} holds a BOOL byte that is neither 0 nor 1")
    if spec.features:
        _check_features(spec, arr)
    return arr


def to_raw(arr: np.ndarray) -> tuple[str, list[int], bytes]:
    """An output array as the OIP binary extension and gRPC ``raw_output_contents`` carry it:
    its datatype, its shape and its little-endian bytes."""
    datatype = NUMPY_TO_V2.get(arr.dtype.name)
    if datatype is None:
        raise InvalidInput(f"an output of type {arr.dtype.name} has no Open Inference Protocol datatype")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return datatype, list(arr.shape), little.tobytes()


def _check_features(spec: TensorSpec, arr: np.ndarray) -> None:
    """Ranges and categories the uploader declared, per column of a rank-2 input."""
    if arr.ndim != 2 or arr.shape[1] != len(spec.features):
        return
    if spec.bounds is not None:
        _check_bounds(spec, arr, *spec.bounds)
    for col, f in enumerate(spec.features):
        if f.categories is not None:
            outside = ~np.isin(arr[:, col], np.asarray(f.categories))
            if outside.any():
                row = int(np.argmax(outside))
                raise InvalidInput(
                    f"input {spec.name!r} row {row}: feature {f.name!r} must be one of {list(f.categories)[:20]}, "
                    f"got {arr[row, col].item()}"
                )


def _check_bounds(spec: TensorSpec, arr: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
    bad = (arr < low) | (arr > high)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        f = spec.features[col]
        raise InvalidInput(
            f"input {spec.name!r} row {row}: feature {f.name!r} must be within [{f.min}, {f.max}], "
            f"got {arr[row, col].item()}"
        )


def _holds_bool(data: list[Any]) -> bool:
    """True when a nested list holds a JSON boolean anywhere (NumPy would turn it into 1 or 0)."""
    stack: list[Any] = [data]
    while stack:
        items = stack.pop()
        for item in items:
            if item is True or item is False:
                return True
            if isinstance(item, list):
                stack.append(item)
    return False


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], max_rows: int) -> None:
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r} must have {len(spec.shape)} dimensions {_fmt(spec.shape)}, got {list(shape)}"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if want is not None and want != got:
            raise InvalidInput(f"input {spec.name!r} must have shape {_fmt(spec.shape)}, got {list(shape)}")
    if shape and shape[0] == 0:
        raise InvalidInput(f"input {spec.name!r} has no rows")
    if shape and shape[0] > max_rows:
        raise InvalidInput(f"input {spec.name!r} has {shape[0]} rows; the limit is {max_rows}")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _describe_kind(kind: str) -> str:
    return {"U": "strings", "S": "strings", "O": "mixed or non-numeric values", "b": "booleans", "f": "floats"}.get(
        kind, "numbers of another kind"
    )
