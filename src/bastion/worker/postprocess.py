"""A version's post-processing, applied by the worker so that what is served is what was evaluated.

With a decision ``threshold`` (binary models), the label output is recomputed from the score
output: the positive label where the positive class's score reaches the threshold, else the other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bastion.runtime.base import LoadedModel
from bastion.signature import Signature


def pick_outputs(
    signature: Signature, label_output: str | None, score_output: str | None
) -> tuple[str | None, str | None]:
    """The label output (integers) and the score output (floats), as named or found by element type."""
    label = label_output or next((o.name for o in signature.outputs if np.dtype(o.dtype).kind in "iu"), None)
    score = score_output or next((o.name for o in signature.outputs if np.dtype(o.dtype).kind == "f"), None)
    return label, score


def positive_scores(values: np.ndarray, positive: int) -> np.ndarray:
    scores = values.reshape(values.shape[0], -1).astype(np.float64)
    if scores.shape[1] == 1:
        return scores[:, 0]
    return scores[:, positive if positive < scores.shape[1] else -1]


class Thresholded:
    """Wraps a loaded model; its label output follows the threshold on the positive class's score."""

    def __init__(self, inner: LoadedModel, signature: Signature, post: dict[str, Any]) -> None:
        self.inner = inner
        self.label, self.score = pick_outputs(signature, post.get("label_output"), post.get("score_output"))
        self.positive = int(post.get("positive_label", 1))
        self.negative = 0 if self.positive != 0 else 1
        self.threshold = float(post["threshold"])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.inner.run(inputs)
        if self.label not in out or self.score not in out:
            return out
        label = out[self.label]
        decided = positive_scores(out[self.score], self.positive) >= self.threshold
        out[self.label] = np.where(decided, self.positive, self.negative).astype(label.dtype).reshape(label.shape)
        return out

    def terminate(self) -> None:
        self.inner.terminate()


def wrap(loaded: LoadedModel, signature: Signature, post: dict[str, Any] | None) -> LoadedModel:
    if not post or post.get("threshold") is None:
        return loaded
    return Thresholded(loaded, signature, post)
