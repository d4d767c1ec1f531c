"""Drift bins: what a version's live inputs and outputs are counted into.

The control plane cuts each numeric input feature of a version's reference sample into
``monitoring_bins`` bins at the sample's quantiles (edges deduplicated, and merged until every bin
holds some of the reference, so a discrete feature gets one bin per value range it takes), keeps
the reference's count per bin, and ships the lot in the snapshot's version entry as
``"monitoring"`` (``spec``). Workers compile it once per version (``Plan``) and count into it; they
never read the artifact store for it.

Outputs are binned too, with fixed bins (there are no reference predictions): an integer label
output per class (``classes`` bins and one for any other value), a score or probability output by
deciles of the score (a single column, or the largest class probability, the confidence). Their
baseline is the version's own previous window (``bastion.monitoring.drift``).

All bins of a version form one flat vector: features first, in order, then outputs; bin ``i``
of a feature with edges ``e`` holds values ``e[i-1] <= x < e[i]`` (``np.searchsorted(e, x,
side="right")``). The spec's ``digest`` names the layout, so counts cut another way (a changed
``monitoring_bins``, another reference) are never mixed with these.

Only inputs of rank 1 (``[rows]``) or 2 (``[rows, columns]``) with a numeric element type are
binned, at most ``MAX_FEATURES`` columns per version; images and sequences are not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from bastion.signature import Signature, TensorSpec

MAX_FEATURES = 256  # binned input columns per version; the rest are not watched
MAX_CLASSES = 64  # label bins per label output (beyond: one "other" bin)
DECILES = tuple(round(i / 10, 1) for i in range(1, 10))
CONFIDENCE = "confidence"
SCORE = "score"
LABEL = "label"


def spec(
    signature: Signature,
    reference: dict[str, Any] | None,
    bins: int,
    postprocessing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The version's monitoring spec (JSON-ready): input features binned at the reference's
    quantiles (none without a reference sample), outputs with fixed bins, and which output the
    confidence metric reads. ``reference`` is the stored sample: input name -> rows."""
    features: list[dict[str, Any]] = []
    rows = 0
    for tensor in signature.inputs:
        if reference is None or tensor.name not in reference or not _numeric(tensor) or len(tensor.shape) > 2:
            continue
        values = np.asarray(reference[tensor.name], dtype=np.float64)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or not values.shape[0]:
            continue
        rows = max(rows, int(values.shape[0]))
        for column in range(values.shape[1]):
            if len(features) >= MAX_FEATURES:
                break
            found = values[:, column]
            found = found[np.isfinite(found)]
            if not found.size:
                continue
            edges = cut(found, bins)
            counts = np.bincount(np.searchsorted(edges, found, side="right"), minlength=len(edges) + 1)
            features.append(
                {
                    "name": _feature_name(signature, tensor, column, values.shape[1]),
                    "input": tensor.name,
                    "column": column if len(tensor.shape) == 2 else None,
                    "edges": [float(e) for e in edges],
                    "ref": [int(c) for c in counts],
                }
            )
    post = postprocessing or {}
    outputs = [_output(tensor, post) for tensor in signature.outputs]
    out: dict[str, Any] = {
        "rows": rows,
        "features": features,
        "outputs": [o for o in outputs if o is not None],
        "confidence": _confidence(signature, post),
    }
    out["digest"] = hashlib.sha256(orjson.dumps(out, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]
    return out


def cut(values: np.ndarray, bins: int) -> np.ndarray:
    """Interior edges at the quantiles ``1/bins .. (bins-1)/bins`` of ``values``, deduplicated,
    then thinned until every bin holds at least one value (a bin the reference never reaches
    would make PSI infinite on the first live row there)."""
    edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
    while edges.size:
        counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)
        empty = np.flatnonzero(counts == 0)
        if not empty.size:
            break
        edges = np.delete(edges, max(int(empty[0]) - 1, 0))  # merge the empty bin with its lower neighbour
    return edges


def sizes(monitoring: dict[str, Any]) -> list[int]:
    """Bins per feature and per output, in the flat layout's order."""
    found = [len(f["edges"]) + 1 for f in monitoring["features"]]
    for o in monitoring["outputs"]:
        found.append(int(o["classes"]) + 1 if o["kind"] == LABEL else len(o["edges"]) + 1)
    return found


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each feature's and output's bins lie in the flat vector."""

    names: tuple[str, ...]  # features, then outputs
    offsets: tuple[int, ...]
    widths: tuple[int, ...]
    features: int  # how many of the names are input features

    @classmethod
    def of(cls, monitoring: dict[str, Any]) -> Layout:
        widths = sizes(monitoring)
        offsets = tuple(int(o) for o in np.cumsum([0, *widths])[:-1])
        names = tuple([f["name"] for f in monitoring["features"]] + [o["name"] for o in monitoring["outputs"]])
        return cls(names, offsets, tuple(widths), len(monitoring["features"]))

    @property
    def size(self) -> int:
        return sum(self.widths)

    def slice(self, i: int) -> slice:
        return slice(self.offsets[i], self.offsets[i] + self.widths[i])


def _kind(tensor: TensorSpec) -> str:
    """The numpy kind of the tensor's element type ('' for strings and the unknown)."""
    try:
        return str(np.dtype(tensor.dtype).kind)
    except TypeError:
        return ""


def _numeric(tensor: TensorSpec) -> bool:
    return _kind(tensor) in tuple("fiub")


def _feature_name(signature: Signature, tensor: TensorSpec, column: int, columns: int) -> str:
    if column < len(tensor.features):
        name = tensor.features[column].name
    else:
        name = f"{tensor.name}[{column}]" if columns > 1 or len(tensor.shape) == 2 else tensor.name
    if len(signature.inputs) > 1 and column < len(tensor.features):
        name = f"{tensor.name}:{name}"
    return name[:128]


def _output(tensor: TensorSpec, post: dict[str, Any]) -> dict[str, Any] | None:
    kind = _kind(tensor)
    if len(tensor.shape) not in (1, 2):
        return None
    columns = tensor.shape[1] if len(tensor.shape) == 2 else 1
    if kind in "iu" and columns == 1:
        classes = min(len(tensor.labels) or 16, MAX_CLASSES)
        return {"name": tensor.name, "output": tensor.name, "kind": LABEL, "classes": classes}
    if kind != "f":
        return None
    if columns == 1:
        return {"name": tensor.name, "output": tensor.name, "kind": SCORE, "edges": list(DECILES)}
    if post.get("score_output") == tensor.name and columns == 2:
        return {
            "name": tensor.name,
            "output": tensor.name,
            "kind": SCORE,
            "column": int(post.get("positive_label", 1)),
            "edges": list(DECILES),
        }
    return {"name": f"{tensor.name}:{CONFIDENCE}", "output": tensor.name, "kind": CONFIDENCE, "edges": list(DECILES)}


def _confidence(signature: Signature, post: dict[str, Any]) -> dict[str, Any] | None:
    """Which output the confidence histogram reads: the post-processing's score output (its
    positive class's column when it has two), else the first float output with several columns
    (its largest value: the top class probability)."""
    outputs = {o.name: o for o in signature.outputs}
    named = outputs.get(post.get("score_output") or "")
    if named is not None and _kind(named) == "f":
        two = len(named.shape) == 2 and named.shape[1] == 2
        return {"output": named.name, "column": int(post.get("positive_label", 1)) if two else None}
    for o in signature.outputs:
        if _kind(o) == "f" and len(o.shape) == 2 and (o.shape[1] or 0) > 1:
            return {"output": o.name, "column": None}
    return None
