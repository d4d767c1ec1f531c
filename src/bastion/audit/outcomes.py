"""Decision outcomes: what a decision predicted, in a few columns (``decision_outcomes``).

The decision log appends one outcome row per decision, in the transaction of its leaf, from the
outputs the ``audit`` stream carries in clear (the leaf keeps only their digest). Live accuracy
(``bastion.monitoring.feedback``) grades labels against it, for every tenant, whether or not its
log keeps payloads: nothing needs decrypting.

The outputs are read by the version's conventions, as the worker's post-processing reads them
(``worker/postprocess.py pick_outputs``; the rule, copied, not imported): the label output is the
post-processing ``label_output``, else the first integer output of the signature; the score output
is ``score_output``, else the first float output. Of a one-row prediction:

- ``label``: its class (the label output's one value; the worker applied any decision threshold);
- ``score``: with a label, the positive class's score (a score output of 1 or 2 columns:
  ``positive_label``'s column) or, with more columns, the highest class probability (``classes``
  says which: 1 or 2 for a positive-class score, else the number of classes);
- ``value``: with no label output, the one value of the score output (a regression).

A prediction of several rows keeps its ``rows`` and nothing else: a label names one outcome.

Outcome rows are personal data linked to a decision: each names its subject's pseudonym
(``subject``; a caller that names none is its key's subject, as its data keys are) so erasure
deletes them (``audit/subjects.py``), and the retention sweep deletes those older than
``accuracy_window_s`` (``audit/retention.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion import codec
from bastion.errors import BastionError
from bastion.registry.metadata import stored


@dataclass(frozen=True, slots=True)
class Reading:
    """How a version's outputs are read: which output holds the label, which the scores."""

    label_output: str | None = None
    score_output: str | None = None
    positive_label: int = 1
    named: bool = False  # the names come from the version's signature (else: found in the outputs by type)


@dataclass(frozen=True, slots=True)
class Outcome:
    rows: int
    label: int | None = None
    score: float | None = None
    classes: int | None = None
    value: float | None = None


def reading(signature: dict[str, Any] | None, meta: dict[str, Any] | None) -> Reading:
    """The reading of a version from its stored signature and metadata (``model_versions``)."""
    try:
        post = stored(meta).postprocessing
        label_output, score_output, positive = post.label_output, post.score_output, post.positive_label
    except ValueError:
        label_output, score_output, positive = None, None, 1
    outputs = [o for o in (signature or {}).get("outputs") or [] if isinstance(o, dict)]
    if not outputs:
        return Reading(label_output, score_output, positive)

    def first(kinds: str) -> str | None:
        for o in outputs:
            try:
                if np.dtype(str(o.get("dtype"))).kind in kinds:
                    return str(o.get("name"))
            except TypeError:
                continue
        return None

    return Reading(label_output or first("iu"), score_output or first("f"), positive, named=True)


def summarize(outputs: dict[str, np.ndarray], how: Reading, rows: int = 0) -> Outcome:
    """The outcome of one decision's decoded ``outputs`` (``rows``: as its event counted them)."""
    label_name, score_name = how.label_output, how.score_output
    if not how.named:  # no signature known: by element type, in the order the outputs came
        label_name = label_name or next((n for n, a in outputs.items() if a.dtype.kind in "iu"), None)
        score_name = score_name or next((n for n, a in outputs.items() if a.dtype.kind == "f"), None)
    labels = outputs.get(label_name) if label_name else None
    scores = outputs.get(score_name) if score_name else None
    if scores is not None and scores.dtype.kind != "f":
        scores = None
    if not rows:
        first = labels if labels is not None else scores
        rows = int(first.shape[0]) if first is not None and first.ndim >= 1 else 1
    if rows != 1:
        return Outcome(rows=rows)
    if labels is not None and labels.dtype.kind in "iu":
        if labels.size != 1:
            return Outcome(rows=rows)
        label = int(labels.flat[0])
        if scores is None or scores.size == 0 or (scores.ndim >= 1 and scores.shape[0] != 1):
            return Outcome(rows=rows, label=label)
        width = int(scores.size)
        if width == 1:
            score = float(scores.flat[0])
        elif width == 2:
            score = float(scores.flat[min(how.positive_label, 1)])
        else:
            score = float(scores.max())
        return Outcome(rows=rows, label=label, score=score if math.isfinite(score) else None, classes=width)
    if labels is None and scores is not None and scores.size == 1:
        value = float(scores.flat[0])
        return Outcome(rows=rows, value=value if math.isfinite(value) else None)
    return Outcome(rows=rows)


def outcome_of(blob: bytes, how: Reading, rows: int) -> Outcome:
    """The outcome of a decision's encoded outputs (``codec``); only ``rows`` when they do not
    decode, or when the prediction has several rows (not decoded at all)."""
    if rows > 1:
        return Outcome(rows=rows)
    try:
        return summarize(codec.decode(blob), how, rows)
    except (BastionError, ValueError, TypeError):
        return Outcome(rows=rows)
