"""Models made for chaos tests: real ONNX graphs run by onnxruntime.

Both take ``x`` (rows of 30 floats), do their costly work on a matrix built from it, and return
``x[:, :1]`` plus zero times a reduction of that matrix (so onnxruntime cannot skip the work).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def slow_model(size: int = 1500, steps: int = 36) -> bytes:
    """``steps`` 1500x1500 matrix products built from the input (nothing for onnxruntime to fold
    away): about 50 ms a product on one core, whatever the input."""
    from onnx import helper

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["z", "tiny"], ["v"]),
        helper.make_node("Expand", ["v", "shape"], ["m0"]),
    ]
    nodes += [helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]) for i in range(steps)]
    constants = {"tiny": np.array(1e-4, np.float32), "shape": np.array([size, size], np.int64)}
    return _model("slow", nodes, f"m{steps}", constants)


def runaway_model(steps: int = 40) -> bytes:
    """Cheap for ordinary rows, runaway for a hostile one: the first input value ``n`` sizes an
    ``n x n`` matrix squared ``steps`` times (through tanh, so values stay near 1: no denormal
    slowdowns). n=1: microseconds; n=1000: about 0.1 s a step on one core. A warm-up on zeros
    makes a 0 x 0 matrix and costs nothing."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Slice", ["x", "origin", "one_one", "axes01"], ["corner"]),
        helper.make_node("Reshape", ["corner", "flat"], ["corner1"]),
        helper.make_node("Cast", ["corner1"], ["n"], to=TensorProto.INT64),
        helper.make_node("Concat", ["n", "n"], ["shape"], axis=0),
        helper.make_node("Expand", ["half", "shape"], ["m0"]),
    ]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"p{i}"]))
        nodes.append(helper.make_node("Tanh", [f"p{i}"], [f"m{i + 1}"]))
    constants = {
        "origin": np.array([0, 0], np.int64),
        "one_one": np.array([1, 1], np.int64),
        "axes01": np.array([0, 1], np.int64),
        "flat": np.array([1], np.int64),
        "half": np.array(0.5, np.float32),
    }
    return _model("runaway", nodes, f"m{steps}", constants)


def _model(name: str, nodes: list[Any], matrix: str, constants: dict[str, np.ndarray]) -> bytes:
    """The graph ``nodes`` + y = x[:, :1] + 0 * mean(matrix), as an ONNX model (opset 13)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        *nodes,
        helper.make_node("ReduceMean", [matrix], ["r"], keepdims=0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Slice", ["x", "start", "end", "axis"], ["x0"]),
        helper.make_node("Add", ["x0", "r0"], ["y"]),
    ]
    constants = {
        **constants,
        "zero": np.array(0.0, np.float32),
        "start": np.array([0], np.int64),
        "end": np.array([1], np.int64),
        "axis": np.array([1], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 30])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()
