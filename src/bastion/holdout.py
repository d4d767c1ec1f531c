"""Holdout sets: labelled rows (and optionally a protected attribute) a version is evaluated on.

The control plane validates an upload and stores it, canonically encoded, in the artifact store;
the worker that runs an evaluation reads it back by digest (so it is verified like a model).
The format is JSON and is never executed::

    {"inputs": {"<input name>": [[...], ...]}, "labels": [0, 1, ...], "protected": ["a", "b", ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bastion.errors import InvalidInput

MAX_ROWS = 100_000
MAX_GROUPS = 64


@dataclass(frozen=True, slots=True)
class Holdout:
    inputs: dict[str, list[Any]]
    labels: np.ndarray
    protected: np.ndarray | None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    @property
    def groups(self) -> list[str]:
        return sorted({str(g) for g in self.protected}) if self.protected is not None else []


def validate(doc: Any) -> Holdout:
    """Check an uploaded holdout document; raise ``InvalidInput`` saying what is wrong."""
    if not isinstance(doc, dict) or set(doc) - {"inputs", "labels", "protected"}:
        raise InvalidInput("a holdout set is an object with 'inputs', 'labels' and optionally 'protected'")
    inputs, labels, protected = doc.get("inputs"), doc.get("labels"), doc.get("protected")
    if not isinstance(inputs, dict) or not inputs or len(inputs) > 64:
        raise InvalidInput("'inputs' maps each model input name to its rows")
    if not isinstance(labels, list) or not labels:
        raise InvalidInput("'labels' is a non-empty list of class labels")
    if len(labels) > MAX_ROWS:
        raise InvalidInput(f"a holdout set has at most {MAX_ROWS} rows")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise InvalidInput("'labels' must be integers (class indices)")
    for name, rows in inputs.items():
        if not isinstance(rows, list) or len(rows) != len(labels):
            raise InvalidInput(f"input {name!r} must have one row per label ({len(labels)})")
    groups = None
    if protected is not None:
        if not isinstance(protected, list) or len(protected) != len(labels):
            raise InvalidInput("'protected' must have one value per label")
        if not all(isinstance(v, str | int) and not isinstance(v, bool) and len(str(v)) <= 64 for v in protected):
            raise InvalidInput("'protected' values are short strings or integers (group names)")
        groups = np.asarray([str(v) for v in protected])
        if len(set(groups.tolist())) > MAX_GROUPS:
            raise InvalidInput(f"'protected' has more than {MAX_GROUPS} groups")
    return Holdout(inputs=inputs, labels=np.asarray(labels, dtype=np.int64), protected=groups)


def encode(holdout: Holdout) -> bytes:
    doc: dict[str, Any] = {"inputs": holdout.inputs, "labels": holdout.labels.tolist()}
    if holdout.protected is not None:
        doc["protected"] = holdout.protected.tolist()
    return orjson.dumps(doc)


def decode(data: bytes) -> Holdout:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the holdout set is not valid JSON") from exc
    return validate(doc)
