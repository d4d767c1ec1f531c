"""Run jobs of one model version: as one batched model call where that is safe, else one by one.

Batching concatenates the jobs' rows, so it is only used when every input has a dynamic first
(row) dimension and rank ≥ 2, and every output has a dynamic first dimension; after the call,
every output must have exactly one row per input row, or the jobs are run one by one instead.
A model whose outputs mix rows (e.g. a softmax across the batch) cannot be detected from its
shapes; such a model must not be served with batching (see ``Signature.batchable``).

A loaded model with a ``pad_values`` attribute (input name → pad value: a text encoder's
``input_ids`` and ``attention_mask``) has jobs of different widths batched by right-padding those
inputs to the widest; every other model's inputs are concatenated as they are.

``observe`` (``bastion.monitoring.counting.Observation``) sees each model call's decoded inputs
and outputs, and the rows of each job, once the call succeeded; an observer that fails never
fails the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from bastion import codec, logs, metrics
from bastion.runtime.base import LoadedModel

log = logs.get("bastion.worker")


class Observe(Protocol):
    def __call__(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], rows: Sequence[int] | None = None
    ) -> None: ...


class Unsplittable(Exception):
    """The batched outputs do not have one row per input row."""


def run_batch(model: LoadedModel, blobs: list[bytes], observe: Observe | None = None) -> list[bytes]:
    """Concatenate the jobs' inputs, call the model once, and return one output blob per job."""
    decoded = [codec.decode(b) for b in blobs]
    if len(decoded) == 1:
        single = model.run(decoded[0])
        if observe is not None:
            _observe(observe, decoded[0], single, None)
        return [codec.encode(single)]
    names = list(decoded[0])
    rows = [len(d[names[0]]) for d in decoded]
    pad_values: Mapping[str, int | float] | None = getattr(model, "pad_values", None)
    if pad_values:
        decoded = pad_to_widest(decoded, pad_values)
    batch = {name: np.concatenate([d[name] for d in decoded], axis=0) for name in names}
    outputs = model.run(batch)
    total = sum(rows)
    if any(value.ndim == 0 or value.shape[0] != total for value in outputs.values()):
        raise Unsplittable("the model's outputs do not have one row per input row")
    if observe is not None:
        _observe(observe, batch, outputs, rows)
    bounds = np.cumsum([0, *rows])
    return [
        codec.encode({name: value[bounds[i] : bounds[i + 1]] for name, value in outputs.items()})
        for i in range(len(decoded))
    ]


def pad_to_widest(
    decoded: list[dict[str, np.ndarray]], pad_values: Mapping[str, int | float]
) -> list[dict[str, np.ndarray]]:
    """Right-pad the inputs named in ``pad_values`` (rank 2, ``[rows, width]``) to the widest job's
    width with their pad value; other inputs are left as they are (then they must agree)."""
    out = [dict(d) for d in decoded]
    for name, value in pad_values.items():
        found = [d.get(name) for d in decoded]
        if any(f is None or f.ndim != 2 for f in found):
            continue  # not this model's layout: concatenation decides (and fails clearly)
        widest = max(f.shape[1] for f in found if f is not None)
        for d, f in zip(out, found, strict=True):
            if f is not None and f.shape[1] < widest:
                d[name] = np.pad(f, ((0, 0), (0, widest - f.shape[1])), constant_values=value)
    return out


def _observe(
    observe: Observe, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], rows: list[int] | None
) -> None:
    try:
        observe(inputs, outputs, rows)
    except Exception as exc:  # an observer never fails the batch
        metrics.ERRORS.labels("worker", "monitoring").inc()
        log.warning("monitoring_observe_failed", error_type=type(exc).__name__)


def run_each(model: LoadedModel, blob: bytes) -> bytes:
    return codec.encode(model.run(codec.decode(blob)))
