"""The ONNX runtime: onnxruntime sessions with configurable threads, CPU provider."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class OnnxModel:
    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self._outputs = [o.name for o in session.get_outputs()]
        self._options = ort.RunOptions()  # one caller at a time: the worker loop

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._options.terminate = False
        values = self._session.run(self._outputs, inputs, self._options)
        return {name: np.asarray(v) for name, v in zip(self._outputs, values, strict=True)}

    def terminate(self) -> None:
        """onnxruntime checks the flag between operators and fails the run."""
        self._options.terminate = True


class OnnxRuntime:
    def __init__(self, intra_threads: int = 1, inter_threads: int = 1) -> None:
        self.intra_threads = intra_threads
        self.inter_threads = inter_threads

    def load(self, artifact: bytes) -> OnnxModel:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_threads
        options.inter_op_num_threads = self.inter_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(artifact, sess_options=options, providers=["CPUExecutionProvider"])
        return OnnxModel(session)
