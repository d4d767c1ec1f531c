"""Run a batch of jobs of one model version as one model call, and split the outputs."""

from __future__ import annotations

import numpy as np

from bastion import codec
from bastion.runtime.base import LoadedModel


def run_batch(model: LoadedModel, blobs: list[bytes]) -> list[bytes]:
    """Concatenate the jobs' inputs, call the model once, and return one output blob per job."""
    decoded = [codec.decode(b) for b in blobs]
    if len(decoded) == 1:
        return [codec.encode(model.run(decoded[0]))]
    names = list(decoded[0])
    rows = [len(d[names[0]]) for d in decoded]
    batch = {name: np.concatenate([d[name] for d in decoded], axis=0) for name in names}
    outputs = model.run(batch)
    bounds = np.cumsum([0, *rows])
    return [
        codec.encode({name: value[bounds[i] : bounds[i + 1]] for name, value in outputs.items()})
        for i in range(len(decoded))
    ]
