"""``ModelInferRequest`` in, tensors out, and outputs back as a ``ModelInferResponse``.

A request carries each input either as ``raw_input_contents`` (one entry per input, in order: the
flat little-endian bytes, as ``tritonclient.grpc`` sends them) or as typed ``contents`` (the
repeated field of its datatype), never both. Either way the tensor goes through the checks JSON
and binary HTTP requests get (``signature.from_raw``: the model's own datatype, a byte count that
fills the shape, a shape that fits, finite floats, declared feature ranges): typed values are laid
out as the bytes a raw request would have sent, after a range check for the narrow integer types
that travel in a wider field.

Outputs go back the way the inputs came: ``raw_output_contents`` for a raw request (what
``tritonclient.grpc``'s ``InferResult.as_numpy`` reads), typed ``contents`` for a typed one, unless
an output's datatype has no typed field (FP16), which makes the whole response raw, as the
protocol wants one form for every output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bastion.errors import InvalidInput, JobFailed
from bastion.gateway.grpc import inference_pb2 as pb
from bastion.signature import NUMPY_TO_V2, V2_TO_NUMPY, Signature, TensorSpec, from_raw, to_raw

# datatype -> the InferTensorContents field that carries it, and that field's element type
CONTENTS: dict[str, tuple[str, str]] = {
    "BOOL": ("bool_contents", "bool"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
}
MAX_DIMS = 8
_MAX_DIM = 1 << 31
_UNSUPPORTED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset", "classification")


def inputs(
    request: pb.ModelInferRequest, signature: Signature, max_rows: int
) -> tuple[dict[str, np.ndarray], list[str] | None, bool]:
    """The request's tensors, the outputs it asks for (None: all) and whether it used raw contents:
    the pipeline's ``parse`` step for gRPC. Raise ``InvalidInput``."""
    items = request.inputs
    if not items:
        raise InvalidInput("the request has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(items):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(items)} inputs: one per input")
    tensors: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        spec = signature.input(item.name)  # first: a name the model does not have is refused, cut short
        name = spec.name
        if name in tensors:
            raise InvalidInput(f"input {name!r} is given twice")
        _refuse_parameters(item.parameters, f"input {name!r}")
        shape = _shape(name, item.shape)
        if raw:
            if item.HasField("contents"):
                raise InvalidInput(f"input {name!r} has contents although the request has raw_input_contents")
            tensors[name] = from_raw(spec, item.datatype, shape, raw[index], max_rows)
        else:
            tensors[name] = _typed(spec, item, shape, max_rows)
    missing = [s.name for s in signature.inputs if s.name not in tensors]
    if missing:
        raise InvalidInput(f"the request is missing inputs {missing}")
    rows = {len(t) for t in tensors.values() if t.ndim}
    if len(rows) > 1:
        raise InvalidInput(f"all inputs must have the same number of rows, got {sorted(rows)}")
    return tensors, _wanted(request, signature), bool(raw)


def _shape(name: str, dims: Any) -> list[int]:
    shape = list(dims)
    if len(shape) > MAX_DIMS or not all(0 <= d <= _MAX_DIM for d in shape):
        raise InvalidInput(f"input {name!r}: the shape must be at most {MAX_DIMS} non-negative integers")
    return shape


def _typed(
    spec: TensorSpec, item: pb.ModelInferRequest.InferInputTensor, shape: list[int], max_rows: int
) -> np.ndarray:
    """A typed input as the raw bytes it stands for, checked by ``from_raw`` like a raw one."""
    name = spec.name
    expected = NUMPY_TO_V2.get(spec.dtype)
    if item.datatype != expected:
        raise InvalidInput(f"input {name!r} must have datatype {expected}, got {item.datatype[:20]!r}")
    if expected not in CONTENTS:
        raise InvalidInput(f"input {name!r}: {expected} values travel only as raw_input_contents")
    field, element = CONTENTS[expected]
    present = [f.name for f, _ in item.contents.ListFields()]
    if any(f != field for f in present):
        raise InvalidInput(f"input {name!r} is {expected}: its values go in contents.{field}, got {present}")
    values = getattr(item.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: {len(values)} values do not fill shape {shape}")
    arr = np.fromiter(values, dtype=element, count=len(values))
    target = np.dtype(V2_TO_NUMPY[expected])
    if target.kind in "iu" and target.itemsize < arr.dtype.itemsize and arr.size:
        info = np.iinfo(target)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidInput(f"input {name!r} holds a value out of range for {expected}")
    little = arr.astype(target.newbyteorder("<"), copy=False).tobytes()
    return from_raw(spec, expected, shape, little, max_rows)


def _wanted(request: pb.ModelInferRequest, signature: Signature) -> list[str] | None:
    if not request.outputs:
        return None
    known = {o.name for o in signature.outputs}
    wanted = []
    for output in request.outputs:
        _refuse_parameters(output.parameters, f"output {output.name!r}")
        if output.name not in known:
            raise InvalidInput(f"unknown output {output.name[:64]!r}; the model has {sorted(known)}")
        if output.name in wanted:
            raise InvalidInput(f"output {output.name!r} is requested twice")
        wanted.append(output.name)
    return wanted


def _refuse_parameters(parameters: Any, what: str) -> None:
    """Shared memory and classification are protocol extensions this server does not offer."""
    for key in parameters:
        if key in _UNSUPPORTED:
            raise InvalidInput(f"{what}: the parameter {key!r} is not supported (no shared memory, no classification)")


def response(
    request: pb.ModelInferRequest,
    model: str,
    version: int,
    answer_id: str,
    outputs: dict[str, np.ndarray],
    wanted: list[str] | None,
    raw: bool,
) -> pb.ModelInferResponse:
    """The outputs (those ``wanted``, else all) as the response to ``request``."""
    names = wanted if wanted is not None else list(outputs)
    missing = [name for name in names if name not in outputs]
    if missing:  # the worker's answer lacks an output the model declares: the job failed, as on HTTP
        raise JobFailed(f"the model returned no output {missing[0][:64]!r}")
    found = [(name, to_raw(outputs[name])) for name in names]
    raw = raw or any(datatype not in CONTENTS for _, (datatype, _, _) in found)
    answer = pb.ModelInferResponse(model_name=model, model_version=str(version), id=request.id or answer_id)
    for name, (datatype, shape, data) in found:
        tensor = answer.outputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            answer.raw_output_contents.append(data)
        else:
            getattr(tensor.contents, CONTENTS[datatype][0]).extend(outputs[name].reshape(-1).tolist())
    return answer
