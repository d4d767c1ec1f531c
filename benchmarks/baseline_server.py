"""The naive baseline: the one-file FastAPI + onnxruntime server a user would write first.

No auth, no queue, no batching: parse the body with a pydantic model, call the model in the
request, return a dict. Two variants, picked with ``--mode``:

* ``def``: a plain ``def`` handler; FastAPI runs it in its threadpool (the usual advice).
* ``async``: an ``async def`` handler calling onnxruntime directly on the event loop.

It runs under uvicorn with the settings Bastion's gateway uses (uvloop, httptools, no access
log), one process, onnxruntime with one intra-op thread. It serves the same path as Bastion
(``/v1/models/breast-cancer/predict``) so the same request works against both (the
``Authorization`` header is ignored), and ``GET /readyz``.

    python benchmarks/baseline_server.py --mode def --port 8200
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

PATH = "/v1/models/breast-cancer/predict"


class PredictRequest(BaseModel):
    inputs: list[list[float]]


def load_session(model_path: Path | None = None) -> ort.InferenceSession:
    if model_path is None:
        data = resources.files("bastion.demo").joinpath("breast_cancer.onnx").read_bytes()
    else:
        data = model_path.read_bytes()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def create_app(mode: str, session: ort.InferenceSession) -> FastAPI:
    app = FastAPI(title=f"naive baseline ({mode})")

    def infer(request: PredictRequest) -> dict[str, Any]:
        x = np.asarray(request.inputs, dtype=np.float32)
        label, probabilities = session.run(["label", "probabilities"], {"input": x})
        return {"outputs": {"label": label.tolist(), "probabilities": probabilities.tolist()}}

    if mode == "def":

        @app.post(PATH)
        def predict_def(request: PredictRequest) -> dict[str, Any]:
            return infer(request)

    else:

        @app.post(PATH)
        async def predict_async(request: PredictRequest) -> dict[str, Any]:
            return infer(request)

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="naive FastAPI + onnxruntime baseline server")
    parser.add_argument("--mode", choices=["def", "async"], required=True)
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", type=Path, help="ONNX file (default: Bastion's demo model)")
    args = parser.parse_args(argv)
    app = create_app(args.mode, load_session(args.model))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        server_header=False,
        backlog=2048,
    )


if __name__ == "__main__":
    main()
