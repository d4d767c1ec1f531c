"""Live quality figures from labelled predictions, each with its interval and sample size.

Pure functions of arrays (no I/O), so that they can be checked against textbook values:

- **accuracy**: the share of predictions whose label matched, with a **Wilson score interval**
  (it stays inside [0, 1] and keeps its coverage at small n and near 0 or 1, where the normal
  approximation does not);
- **AUC** (binary models with a score): the Mann-Whitney estimate (ties count one half) with the
  **Hanley-McNeil** standard error, clipped to [0, 1];
- **F1**: of the positive class for a binary model, else the macro average over the classes seen;
- **MAE** (regression): the mean absolute error with a **Student t** interval;
- **label delay**: seconds from prediction to label, as p50 / p90 / max.

Every interval is two-sided at ``level`` (95 % by default).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats  # type: ignore[import-untyped]

LEVEL = 0.95


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def _figure(value: float, low: float, high: float, n: int) -> dict[str, Any]:
    return {"value": round(value, 6), "low": round(low, 6), "high": round(high, 6), "n": n}


def wilson(successes: int, n: int, level: float = LEVEL) -> dict[str, Any] | None:
    """The share ``successes / n`` with its Wilson score interval; None when n is 0."""
    if n <= 0:
        return None
    z = _z(level)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return _figure(p, max(0.0, centre - half), min(1.0, centre + half), n)


def auc(truth: np.ndarray, scores: np.ndarray, level: float = LEVEL) -> dict[str, Any] | None:
    """AUC of ``scores`` for ``truth`` (1 positive, 0 negative) with a Hanley-McNeil interval;
    None unless both classes are present."""
    positives = int(np.count_nonzero(truth == 1))
    negatives = int(np.count_nonzero(truth == 0))
    if positives == 0 or negatives == 0:
        return None
    ranks = stats.rankdata(scores)  # average ranks: a tie counts one half
    area = float((ranks[truth == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    q1, q2 = area / (2 - area), 2 * area * area / (1 + area)
    variance = (area * (1 - area) + (positives - 1) * (q1 - area * area) + (negatives - 1) * (q2 - area * area)) / (
        positives * negatives
    )
    half = _z(level) * math.sqrt(max(variance, 0.0))
    return _figure(area, max(0.0, area - half), min(1.0, area + half), positives + negatives)


def f1(truth: np.ndarray, predicted: np.ndarray, positive: int | None) -> float | None:
    """F1 of class ``positive``, or (None) the macro average over the classes seen."""
    if truth.size == 0:
        return None
    classes = [positive] if positive is not None else sorted(set(truth.tolist()) | set(predicted.tolist()))
    scores = []
    for c in classes:
        tp = int(np.count_nonzero((predicted == c) & (truth == c)))
        fp = int(np.count_nonzero((predicted == c) & (truth != c)))
        fn = int(np.count_nonzero((predicted != c) & (truth == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return round(float(np.mean(scores)), 6)


def mae(errors: np.ndarray, level: float = LEVEL) -> dict[str, Any] | None:
    """Mean absolute error of ``errors`` (predicted - true) with a Student t interval."""
    n = int(errors.size)
    if n == 0:
        return None
    absolute = np.abs(errors.astype(np.float64))
    mean = float(absolute.mean())
    if n == 1:
        return _figure(mean, mean, mean, 1)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(absolute.std(ddof=1)) / math.sqrt(n)
    return _figure(mean, max(0.0, mean - half), mean + half, n)


def delays(seconds: np.ndarray) -> dict[str, float] | None:
    """The label delay distribution: p50, p90 and max, in seconds."""
    if seconds.size == 0:
        return None
    p50, p90 = np.percentile(seconds, [50, 90])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "max": round(float(seconds.max()), 3)}


def summary(
    truth: np.ndarray,
    predicted: np.ndarray,
    scores: np.ndarray,
    truth_values: np.ndarray,
    predicted_values: np.ndarray,
    delay_s: np.ndarray,
    labels: int,
) -> dict[str, Any]:
    """The figures of one group of labelled predictions (a version, or one role of it).

    ``truth``/``predicted``: class labels of the graded classification rows; ``scores``: the
    positive class's score of those rows (NaN where the version gave none); ``truth_values`` /
    ``predicted_values``: the graded regression rows; ``delay_s``: every label's delay; ``labels``:
    every label received, graded or not (its prediction's outputs may be unreadable)."""
    binary = truth.size > 0 and set(truth.tolist()) | set(predicted.tolist()) <= {0, 1}
    scored = ~np.isnan(scores)
    return {
        "labels": labels,
        "graded": int(truth.size + truth_values.size),
        "accuracy": wilson(int(np.count_nonzero(truth == predicted)), int(truth.size)),
        "auc": auc(truth[scored], scores[scored]) if binary and scored.any() else None,
        "f1": f1(truth, predicted, 1 if binary else None),
        "mae": mae(predicted_values - truth_values),
        "label_delay_s": delays(delay_s),
    }
