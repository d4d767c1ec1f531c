"""Decide, by content and never by file name, whether bytes are a safe ONNX model.

Only ONNX is accepted: it is a protobuf graph of operators and cannot run code when loaded.
Pickle streams, zip archives (``.pt``, ``.npz``, zip-wrapped pickles) and anything that does
not parse and check as an ONNX model are refused, and so is external tensor data anywhere in the
model (initializers, sparse initializers, tensors in node attributes, subgraphs of ``If``/``Loop``/
``Scan``, functions and training graphs), which could point outside the artifact: one fixed
message, whatever the reference names, checked before anything could resolve it.

What the model decodes to is bounded too (``Bounds``): its nodes, graphs, declared tensor bytes
and the size of its signature, so a small upload cannot become a huge model on a worker. This
module is the pure checker; the control plane runs it in a child process with resource limits
(``bastion.artifacts.sandbox``), because parsing a protobuf can itself take many times the
upload's size (a "protobuf bomb").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper

from bastion.errors import InvalidArtifact, PayloadTooLarge
from bastion.signature import Signature, TensorSpec

EXTERNAL_DATA = "the artifact references external tensor data, which is not accepted"

_MAGIC = (
    (b"\x80", "a Python pickle stream"),
    (b"PK\x03\x04", "a zip archive (e.g. a PyTorch .pt or joblib bundle)"),
    (b"\x93NUMPY", "a NumPy array file"),
    (b"\x89HDF", "an HDF5 file"),
)
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


@dataclass(frozen=True, slots=True)
class Bounds:
    """What an accepted model may decode to."""

    max_nodes: int = 500_000  # every node of every graph, subgraphs and functions included
    max_graphs: int = 10_000
    decoded_factor: int = 4  # declared tensor bytes at most this many times the upload limit
    max_io: int = 1024  # graph inputs and outputs
    max_name_chars: int = 512  # of an input or output name
    max_rank: int = 32


DEFAULT_BOUNDS = Bounds()


def precheck(data: bytes, max_bytes: int) -> None:
    """The checks that need no parsing: size and the magic numbers of formats that are not ONNX."""
    if not data:
        raise InvalidArtifact("the artifact is empty")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the artifact is {len(data)} bytes; the limit is {max_bytes}")
    for magic, what in _MAGIC:
        if data.startswith(magic):
            raise InvalidArtifact(f"the artifact is {what}, not an ONNX model; only ONNX is accepted")


def inspect(data: bytes, max_bytes: int, bounds: Bounds = DEFAULT_BOUNDS) -> Signature:
    """Check ``data`` and return the signature derived from its graph."""
    precheck(data, max_bytes)
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidArtifact("the artifact does not parse as an ONNX model") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.opset_import:
        raise InvalidArtifact("the artifact does not parse as an ONNX model (no graph or opset)")
    _check_bounds(model, max_bytes, bounds)  # also refuses external data, before the checker runs
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidArtifact(f"the ONNX model is invalid: {str(exc).splitlines()[0][:200]}") from exc
    return signature_of(model, bounds)


def graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """Every graph of the model: the main one, its subgraphs (any depth), training graphs."""
    stack = [model.graph]
    for info in model.training_info:
        stack += [info.initialization, info.algorithm]
    nodes: list[onnx.NodeProto] = [n for f in model.functions for n in f.node]
    while stack or nodes:
        if stack:
            graph = stack.pop()
            yield graph
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            if attr.HasField("g"):
                stack.append(attr.g)
            stack.extend(attr.graphs)


def tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers, sparse initializers (values and indices) and the
    tensors in node attributes, in every graph and function."""
    for graph in graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from _attribute_tensors(graph.node)
    for function in model.functions:
        yield from _attribute_tensors(function.node)


def _attribute_tensors(nodes: Iterator[onnx.NodeProto] | list[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)
            for sparse in attr.sparse_tensors:
                yield from (sparse.values, sparse.indices)


def _check_bounds(model: onnx.ModelProto, max_bytes: int, bounds: Bounds) -> None:
    count = nodes = 0
    for graph in graphs(model):
        count += 1
        nodes += len(graph.node)
        if count > bounds.max_graphs or nodes > bounds.max_nodes:
            raise InvalidArtifact(
                f"the model has more than {bounds.max_nodes} nodes or {bounds.max_graphs} graphs, which is not served"
            )
    if sum(len(f.node) for f in model.functions) + nodes > bounds.max_nodes:
        raise InvalidArtifact(f"the model has more than {bounds.max_nodes} nodes, which is not served")
    budget = bounds.decoded_factor * max_bytes
    total = 0
    for tensor in tensors(model):
        if tensor.data_location != onnx.TensorProto.DEFAULT or len(tensor.external_data):
            raise InvalidArtifact(EXTERNAL_DATA)
        total += _decoded_bytes(tensor)
        if total > budget:
            raise InvalidArtifact(
                f"the model's tensors decode to more than {budget} bytes ({bounds.decoded_factor}x the upload limit)"
            )


def _decoded_bytes(tensor: onnx.TensorProto) -> int:
    """What a tensor takes once decoded: the larger of what its shape declares and what it holds."""
    elements = 1
    for dim in tensor.dims:
        elements *= max(int(dim), 0)
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 8
    held = len(tensor.raw_data) + sum(8 * len(getattr(tensor, f)) for f in _TYPED_FIELDS if f != "string_data")
    held += sum(len(s) for s in tensor.string_data)
    return max(elements * itemsize, held)


def signature_of(model: onnx.ModelProto, bounds: Bounds = DEFAULT_BOUNDS) -> Signature:
    initializers = {t.name for t in model.graph.initializer}
    if len(model.graph.input) + len(model.graph.output) > bounds.max_io + len(initializers):
        raise InvalidArtifact(f"the model declares more than {bounds.max_io} inputs and outputs, which is not served")
    inputs = tuple(_spec(v, bounds) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, bounds) for v in model.graph.output)
    if not inputs:
        raise InvalidArtifact("the ONNX model declares no inputs")
    if len(inputs) + len(outputs) > bounds.max_io:
        raise InvalidArtifact(f"the model declares more than {bounds.max_io} inputs and outputs, which is not served")
    return Signature(inputs, outputs)


def _spec(value: onnx.ValueInfoProto, bounds: Bounds = DEFAULT_BOUNDS) -> TensorSpec:
    if len(value.name) > bounds.max_name_chars:
        raise InvalidArtifact(f"a tensor name is longer than {bounds.max_name_chars} characters")
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise InvalidArtifact(f"tensor {value.name!r} is not a plain tensor (sequences and maps are not served)")
    try:
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except (KeyError, TypeError) as exc:
        raise InvalidArtifact(f"tensor {value.name!r} has an unsupported element type") from exc
    if dtype not in {"bool", "float16", "float32", "float64"} and not dtype.startswith(("int", "uint")):
        raise InvalidArtifact(f"tensor {value.name!r} has element type {dtype}, which is not served")
    if len(tensor_type.shape.dim) > bounds.max_rank:
        raise InvalidArtifact(f"tensor {value.name!r} has more than {bounds.max_rank} dimensions")
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim)
    return TensorSpec(value.name, dtype, dims)
