"""Evaluate a version on a holdout set: accuracy, AUC, F1 and fairness across a protected attribute.

Runs on a worker (the control plane never runs models). The report is stored with the version
and the control plane checks it against the model's gate thresholds. Metrics are for binary
decisions on ``positive_label`` (one-versus-rest when there are more classes):

* accuracy: share of rows whose predicted class equals the label
* AUC: probability that a positive row scores above a negative one (ties count half)
* F1: harmonic mean of precision and recall on the positive class
* demographic parity difference: largest gap between groups in the share predicted positive
* equal opportunity difference: largest gap between groups in the true-positive rate
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.errors import InvalidInput
from bastion.holdout import Holdout
from bastion.runtime.base import LoadedModel
from bastion.signature import Signature, to_tensor
from bastion.worker.postprocess import pick_outputs, positive_scores

_CHUNK = 512


@dataclass(frozen=True, slots=True)
class Spec:
    holdout: str
    label_output: str | None = None
    score_output: str | None = None
    positive_label: int = 1
    threshold: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spec:
        return cls(
            holdout=str(data["holdout"]),
            label_output=data.get("label_output"),
            score_output=data.get("score_output"),
            positive_label=int(data.get("positive_label", 1)),
            threshold=None if data.get("threshold") is None else float(data["threshold"]),
        )


def evaluate(loaded: LoadedModel, signature: Signature, holdout: Holdout, spec: Spec) -> dict[str, Any]:
    started = time.perf_counter()
    outputs = _run(loaded, signature, holdout)
    for name in (spec.label_output, spec.score_output):
        if name is not None and name not in outputs:
            raise InvalidInput(f"the post-processing names output {name!r}, which the model does not have")
    label_name, score_name = pick_outputs(signature, spec.label_output, spec.score_output)
    scores = positive_scores(outputs[score_name], spec.positive_label) if score_name else None
    if spec.threshold is not None and scores is not None:
        predicted_positive = scores >= spec.threshold
        predicted = None
    elif label_name is not None:
        predicted = outputs[label_name].reshape(holdout.rows, -1)[:, 0].astype(np.int64)
        predicted_positive = predicted == spec.positive_label
    elif scores is not None:
        predicted_positive = scores >= 0.5
        predicted = None
    else:
        raise InvalidInput("the model has no output that holds labels or scores")
    actual_positive = holdout.labels == spec.positive_label
    if predicted is not None:
        accuracy = float(np.mean(predicted == holdout.labels))
    else:
        accuracy = float(np.mean(predicted_positive == actual_positive))
    report: dict[str, Any] = {
        "rows": holdout.rows,
        "holdout_sha256": spec.holdout,
        "label_output": label_name,
        "score_output": score_name,
        "positive_label": spec.positive_label,
        "threshold": spec.threshold,
        "metrics": {
            "accuracy": accuracy,
            "auc": _auc(scores, actual_positive) if scores is not None else None,
            "f1": _f1(predicted_positive, actual_positive),
        },
        "fairness": _fairness(predicted_positive, actual_positive, holdout.protected),
    }
    report["seconds"] = round(time.perf_counter() - started, 4)
    return report


def _run(loaded: LoadedModel, signature: Signature, holdout: Holdout) -> dict[str, np.ndarray]:
    missing = [s.name for s in signature.inputs if s.name not in holdout.inputs]
    if missing:
        raise InvalidInput(f"the holdout set lacks the model input(s) {missing}")
    tensors = {s.name: to_tensor(s, holdout.inputs[s.name], max_rows=holdout.rows) for s in signature.inputs}
    step = _CHUNK if signature.batchable else 1
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, holdout.rows, step):
        result = loaded.run({name: t[start : start + step] for name, t in tensors.items()})
        for name, value in result.items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}


def _auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
    tp = int(np.sum(predicted & actual))
    wrong = int(np.sum(predicted != actual))
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 1.0


def _fairness(predicted: np.ndarray, actual: np.ndarray, groups: np.ndarray | None) -> dict[str, Any] | None:
    if groups is None:
        return None
    per_group: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups.tolist())):
        member = groups == group
        positives = member & actual
        per_group[group] = {
            "rows": int(member.sum()),
            "selection_rate": float(predicted[member].mean()),
            "true_positive_rate": float(predicted[positives].mean()) if positives.any() else None,
        }
    selection = [g["selection_rate"] for g in per_group.values()]
    tpr = [g["true_positive_rate"] for g in per_group.values() if g["true_positive_rate"] is not None]
    return {
        "groups": per_group,
        "demographic_parity_difference": max(selection) - min(selection) if len(selection) > 1 else None,
        "equal_opportunity_difference": max(tpr) - min(tpr) if len(tpr) > 1 else None,
    }
