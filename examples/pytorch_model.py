"""Train a small PyTorch model and export it as ONNX for Bastion.

Run from the repository root:

    .venv/bin/python examples/pytorch_model.py [--out build/examples/churn.onnx]

It trains a two-layer network for a few hundred steps on synthetic, seeded data (8 features of
a customer -> will they churn: no / yes), exports it with ``torch.onnx.export(..., dynamo=True)``
with a dynamic batch dimension, checks the ONNX file with ONNX Runtime against PyTorch, and writes
it with ``churn.json``, a request body of two rows ready for ``curl -d @build/examples/churn.json``.

The exported graph has one input, ``features`` (float32 [N, 8]), and two outputs:
``probabilities`` (float32 [N, 2], a softmax per row) and ``label`` (int64 [N], the arg-max),
so a response carries both. Each row is computed on its own, so Bastion may batch rows of
different requests into one model call.

Needs the ``examples`` extra (torch CPU and onnxscript): ``.venv/bin/pip install -e '.[examples]'``;
outside this project ``pip install torch --index-url https://download.pytorch.org/whl/cpu`` is
the small CPU-only build.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MODEL = "churn"
FEATURES = 8


class Churn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.net(features), dim=1)
        return probabilities, probabilities.argmax(dim=1)


def synthetic(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 8 standard-normal features; churn when a fixed mix of them is positive (plus noise)."""
    x = torch.randn(rows, FEATURES, generator=generator)
    weights = torch.tensor([1.5, -2.0, 0.5, 0.0, 1.0, 0.0, -0.5, 0.8])
    y = ((x @ weights + 0.3 * torch.randn(rows, generator=generator)) > 0).long()
    return x, y


def train(steps: int = 300) -> Churn:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x, y = synthetic(2048, generator)
    model = Churn()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_fn(model.net(x), y)
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x)[1] == y).float().mean().item()
    print(f"trained {steps} steps, training accuracy {accuracy:.3f}")
    return model


def export(model: Churn, out: Path) -> None:
    # The exporter's notes about optional packages (torchvision) and a deprecation inside torch
    # itself say nothing about this model; keep the output to what matters.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    example = torch.zeros(2, FEATURES)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        input_names=["features"],
        output_names=["probabilities", "label"],
        # Keys are forward()'s argument names; dimension 0 (the rows) is dynamic.
        dynamic_shapes={"features": {0: torch.export.Dim("batch")}},
        external_data=False,  # Bastion refuses external tensor data: everything inside the one file
        verbose=False,
    )
    assert program is not None
    model_proto = program.model_proto
    model_proto.doc_string = "churn classifier (8 float features) exported from PyTorch"
    onnx.checker.check_model(model_proto)

    # ONNX Runtime must agree with PyTorch on a batch of a size the export never saw.
    rows = synthetic(5, torch.Generator().manual_seed(1))[0]
    data = model_proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    probabilities, label = session.run(["probabilities", "label"], {"features": rows.numpy()})
    with torch.no_grad():
        want_p, want_label = model(rows)
    assert np.allclose(probabilities, want_p.numpy(), atol=1e-5), "ONNX probabilities differ from PyTorch's"
    assert (label == want_label.numpy()).all(), "ONNX labels differ from PyTorch's"

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    request = out.with_suffix(".json")
    body = {"inputs": [[round(v, 4) for v in row] for row in rows[:2].tolist()]}
    request.write_text(json.dumps(body) + "\n")

    print(f"wrote {out} ({out.stat().st_size} bytes)")
    print(f'  input  "features": float32 [N, {FEATURES}]')
    print('  output "probabilities": float32 [N, 2] (no, yes); "label": int64 [N]')
    print(f"wrote {request} (a request body, 2 rows)")
    print()
    print("Next, with Bastion running (./run-bastion) and a key in $KEY:")
    print(f"  ./bastion models register {MODEL} {out}")
    print(
        f'  curl -sf http://127.0.0.1:8000/v1/models/{MODEL}/predict -H "Authorization: Bearer $KEY" '
        f"-H 'Content-Type: application/json' -d @{request}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/examples/churn.onnx"), help="ONNX file to write")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    args = parser.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    export(train(args.steps), args.out)


if __name__ == "__main__":
    main()
