"""Compare a shadow version's outputs with the answer the client got, and keep running totals.

Per shadow version, in ``shadow:{model}:{version}``: ``requests``, ``rows``, ``agree_rows`` (rows
whose integer outputs, e.g. labels, all equal the answer's), ``abs_diff_sum`` and ``values``
(over floating-point outputs: the mean absolute difference is their ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bastion import codec


@dataclass(slots=True)
class Comparison:
    rows: int = 0
    agree_rows: int = 0
    abs_diff_sum: float = 0.0
    values: int = 0


def compare(answer_blob: bytes, shadow_blob: bytes) -> Comparison:
    answer, shadow = codec.decode(answer_blob), codec.decode(shadow_blob)
    common = [name for name in answer if name in shadow and answer[name].shape == shadow[name].shape]
    if not common:
        return Comparison()
    rows = len(answer[common[0]]) if answer[common[0]].ndim else 1
    agree = np.ones(rows, dtype=bool)
    result = Comparison(rows=rows)
    for name in common:
        a, b = answer[name], shadow[name]
        if a.dtype.kind in "iub":
            agree &= (a == b).reshape(rows, -1).all(axis=1) if a.ndim else bool(a == b)
        else:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            result.abs_diff_sum += float(diff.sum())
            result.values += int(diff.size)
    result.agree_rows = int(agree.sum())
    return result
