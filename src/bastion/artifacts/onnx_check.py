"""Decide, by content and never by file name, whether bytes are a safe ONNX model.

Only ONNX is accepted: it is a protobuf graph of operators and cannot run code when loaded.
Pickle streams, zip archives (``.pt``, ``.npz``, zip-wrapped pickles) and anything that does
not parse and check as an ONNX model are refused, and so is external tensor data, which
could point outside the artifact.
"""

from __future__ import annotations

import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from bastion.errors import InvalidArtifact, PayloadTooLarge
from bastion.signature import Signature, TensorSpec

_MAGIC = (
    (b"\x80", "a Python pickle stream"),
    (b"PK\x03\x04", "a zip archive (e.g. a PyTorch .pt or joblib bundle)"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file"),
)


def inspect(data: bytes, max_bytes: int) -> Signature:
    """Check ``data`` and return the signature derived from its graph."""
    if not data:
        raise InvalidArtifact("the artifact is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the artifact is {len(data)} bytes; the limit is {max_bytes}")
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise InvalidArtifact(f"the artifact is {what}, not an ONNX model; only ONNX is accepted")
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidArtifact("the artifact does not parse as an ONNX model") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise InvalidArtifact("the artifact does not parse as an ONNX model (no graph or opset)")
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise InvalidArtifact("the artifact references external tensor data, which is not accepted")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidArtifact(f"the ONNX model is invalid: {str(exc).splitlines()[0][:200]}") from exc
    return signature_of(model)


def signature_of(model: onnx.ModelProto) -> Signature:
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    if not inputs:
        raise InvalidArtifact("the ONNX model declares no inputs")
    return Signature(inputs, outputs)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise InvalidArtifact(f"tensor {value.name!r} is not a plain tensor (sequences and maps are not served)")
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except (KeyError, TypeError) as exc:
        raise InvalidArtifact(f"tensor {value.name!r} has an unsupported element type") from exc
    if dtype not in {"bool", "float16", "float32", "float64"} and not dtype.startswith(("int", "uint")):
        raise InvalidArtifact(f"tensor {value.name!r} has element type {dtype}, which is not served")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)
    return TensorSpec(value.name, dtype, dims)
