"""An onnxruntime CPU session for a text model's bytes (the one module here that opens sessions)."""

from __future__ import annotations

from typing import Any

import onnxruntime as ort


def open_session(model: bytes, *, intra_threads: int = 1, inter_threads: int = 1) -> Any:
    """A CPU session with full graph optimisation; quiet unless something fails."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_threads
    options.inter_op_num_threads = inter_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
