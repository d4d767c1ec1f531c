"""Look inside an existing ONNX file: what it takes, what it returns, whether Bastion serves it,
and the request body Bastion expects for it.

Run from the repository root:

    .venv/bin/python examples/onnx_file.py [FILE.onnx] [--request BODY.json] [--rows N]

FILE defaults to the bundled demo model (``src/bastion/demo/breast_cancer.onnx``). The script

1. lists the graph's inputs and outputs (name, element type, shape; ``N`` is a dynamic
   dimension), read with ``onnx``;
2. runs the same check the control plane runs on an upload (``bastion.artifacts.onnx_check``:
   a parseable, valid ONNX graph of plain tensors, no external data, within size bounds) and
   prints the signature Bastion derives, or why the file would be refused;
3. builds a request body of ``--rows`` rows of seeded values in that shape, runs it through
   ONNX Runtime and prints both, so the body can be sent with ``curl -d @BODY.json`` and the
   answer compared.

A model with one input takes ``{"inputs": [row, ...]}``; one with several takes an object of
named arrays, ``{"inputs": {"a": [...], "b": [...]}}``, with the same number of rows each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

DEMO = Path(__file__).resolve().parent.parent / "src" / "bastion" / "demo" / "breast_cancer.onnx"
UPLOAD_LIMIT = 256 << 20  # the control plane's default max_upload_bytes

# ONNX Runtime's type strings -> NumPy dtypes (the element types Bastion serves).
DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bool)": "bool",
    **{f"tensor({t})": t for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")},
}


def shape_text(shape: list[Any]) -> str:
    """``[N, 30]``: a dimension without a fixed size (None or a symbolic name) is ``N``."""
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in shape) + "]"


def describe(model: onnx.ModelProto) -> None:
    """The graph's inputs (less the initializers, which are weights) and outputs, from the file."""
    weights = {t.name for t in model.graph.initializer}
    for title, values in (
        ("inputs", [v for v in model.graph.input if v.name not in weights]),
        ("outputs", list(model.graph.output)),
    ):
        print(f"{title}:")
        for value in values:
            if not value.type.HasField("tensor_type"):
                print(f"  {value.name:<24} {value.type.WhichOneof('value')} (not a tensor)")
                continue
            tensor = value.type.tensor_type
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            except (KeyError, TypeError):
                dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            print(f"  {value.name:<24} {dtype:<8} {shape_text(dims)}")


def bastion_check(data: bytes) -> bool:
    """The upload check of the control plane, run here; False (with the reason) when refused."""
    try:
        from bastion.artifacts import onnx_check
        from bastion.errors import BastionError
    except ImportError:  # outside a Bastion checkout: the ONNX Runtime view above is what there is
        print("Bastion: not installed here; skipping its upload check")
        return True
    try:
        signature = onnx_check.inspect(data, UPLOAD_LIMIT)
    except BastionError as exc:
        print(f"Bastion: refused: {exc.detail}")
        return False
    print("Bastion: accepted. Derived signature:")
    print("  " + json.dumps(signature.to_dict()))
    print(f"  rows of different requests share one model call (batching): {'yes' if signature.batchable else 'no'}")
    return True


def sample(session: ort.InferenceSession, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``rows`` rows per input in the input's shape (other dynamic dimensions: 1), seeded values
    (floats with 4 decimals, so the JSON body reads as it is sent)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for arg in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        if dims:
            dims[0] = rows
        dtype = np.dtype(DTYPES.get(arg.type, "float32"))
        if dtype.kind == "f":
            values = rng.random(dims).round(4)
        elif dtype.kind == "b":
            values = rng.random(dims) < 0.5
        else:
            values = rng.integers(0, 2, dims)
        tensors[arg.name] = values
    return tensors


def body_of(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``POST /v1/models/{name}/predict`` body for these tensors."""
    if len(tensors) == 1:
        return {"inputs": next(iter(tensors.values())).tolist()}
    return {"inputs": {name: value.tolist() for name, value in tensors.items()}}


def model_name(path: Path) -> str:
    """A model name Bastion accepts (lower case, digits, ``.``, ``_``, ``-``), from the file name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")
    return (name or "model")[:64]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=DEMO, help="ONNX file (default: the demo model)")
    parser.add_argument("--request", type=Path, help="write the request body here (JSON)")
    parser.add_argument("--rows", type=int, default=1, help="rows in the request body")
    parser.add_argument("--name", help="model name for the commands printed at the end (default: from FILE)")
    args = parser.parse_args()

    if args.file.is_absolute() and args.file.is_relative_to(Path.cwd()):
        args.file = args.file.relative_to(Path.cwd())  # as it would be typed from here
    data = args.file.read_bytes()
    model = onnx.load_model_from_string(data)
    opsets = ", ".join(sorted({f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import}))
    producer = f"{model.producer_name} {model.producer_version}".strip() or "unknown"
    print(f"{args.file}: {len(data)} bytes, produced by {producer}, opsets {opsets}")
    if model.doc_string:
        print(f"  {model.doc_string}")
    describe(model)
    if not bastion_check(data):
        return 1
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])

    tensors = sample(session, args.rows)
    body = body_of(tensors)
    text = json.dumps(body)
    if args.request:
        args.request.parent.mkdir(parents=True, exist_ok=True)
        args.request.write_text(text + "\n")
        print(f"Request body ({args.rows} row{'s' if args.rows != 1 else ''}) written to {args.request}")
    else:
        print("Request body:")
        print("  " + (text if len(text) <= 2000 else text[:2000] + " ..."))
    feed = {arg.name: tensors[arg.name].astype(DTYPES.get(arg.type, "float32")) for arg in session.get_inputs()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
    print("ONNX Runtime's answer to it (Bastion's \"outputs\" should match):")
    print("  " + json.dumps({name: value.tolist() for name, value in outputs.items()}))

    name = args.name or model_name(args.file)
    body_arg = f"@{args.request}" if args.request else "'" + (text if len(text) <= 200 else "...") + "'"
    print()
    print("Next, with Bastion running (./run-bastion) and a key in $KEY:")
    print(f"  ./bastion models register {name} {args.file}")
    print(
        f'  curl -sf http://127.0.0.1:8000/v1/models/{name}/predict -H "Authorization: Bearer $KEY" '
        f"-H 'Content-Type: application/json' -d {body_arg}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
