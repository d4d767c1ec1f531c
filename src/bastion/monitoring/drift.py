"""Judging drift: PSI and Jensen-Shannon distance between live bin counts and a baseline, against
a threshold calibrated for the sample sizes.

For a feature cut into ``k`` bins, with ``n`` live rows and ``m`` baseline rows drawn from the
same distribution, ``n·m/(n+m) · PSI`` tends to a chi-square with ``k-1`` degrees of freedom
(PSI is the symmetrised Kullback-Leibler divergence; to second order it is Pearson's two-sample
chi-square statistic divided by ``n·m/(n+m)``). So the threshold is

    threshold = (1/n + 1/m) · chi2.ppf(1 - alpha / (features · looks), k - 1)

a false-alarm rate of at most ``alpha`` per window of monitored time for an unchanged version:
Bonferroni over its features and over the ``looks`` judgements made while one window passes
(``looks(window_s, interval_s)``: the window's minute buckets, or its judging intervals if those
are longer; judgements a minute apart see almost the same data, so this is conservative). A
fixed cut-off such as 0.1 would fire on unchanged data at small ``n`` and miss real drift at
large ``n``; this one is as strict as the sample allows. Counts are smoothed by half a row per
bin (so an empty bin does not make PSI infinite); JS is the Jensen-Shannon distance (base 2,
0..1) of the unsmoothed proportions, reported beside PSI, not judged.

Input features are judged against the version's reference sample (``bastion.monitoring.bins``);
outputs, which have no reference predictions, against the version's previous window of the same
length (period over period), with the same formula.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon  # type: ignore[import-untyped]
from scipy.stats import chi2  # type: ignore[import-untyped]

from bastion.monitoring.bins import Layout

SMOOTHING = 0.5  # rows added to every bin of both sides before PSI


def psi(live: np.ndarray, baseline: np.ndarray) -> float:
    """Population stability index of two count vectors (smoothed by ``SMOOTHING`` per bin)."""
    p = (live + SMOOTHING) / (live.sum() + SMOOTHING * live.size)
    q = (baseline + SMOOTHING) / (baseline.sum() + SMOOTHING * baseline.size)
    return float(np.sum((p - q) * np.log(p / q)))


def js_distance(live: np.ndarray, baseline: np.ndarray) -> float:
    if not live.sum() or not baseline.sum():
        return 0.0
    found = float(jensenshannon(live / live.sum(), baseline / baseline.sum(), base=2))
    return found if math.isfinite(found) else 0.0


def threshold(n: int, m: int, bins: int, alpha: float, tests: int) -> float:
    """The PSI beyond which ``bins`` bins of ``n`` live and ``m`` baseline rows are judged
    different, at false-alarm rate ``alpha`` shared by ``tests`` judgements (Bonferroni)."""
    if n <= 0 or m <= 0 or bins < 2:
        return math.inf
    return float((1 / n + 1 / m) * chi2.ppf(1 - alpha / max(tests, 1), bins - 1))


def looks(window_s: float, interval_s: float) -> int:
    """Judgements per window that share ``alpha``: one per minute bucket, or per judging
    interval when that is longer."""
    return max(1, math.ceil(window_s / max(interval_s, 60.0)))


def judge(
    monitoring: dict[str, Any],
    live: np.ndarray,
    rows: int,
    alpha: float,
    min_rows: int,
    previous: np.ndarray | None = None,
    previous_rows: int = 0,
    looks: int = 1,
) -> dict[str, Any]:
    """A version's features (against the reference) and outputs (against ``previous``, the
    window before), from flat count vectors in ``monitoring``'s layout (``Layout``); ``alpha``
    is shared by all features and ``looks`` judgements (see the module's docstring)."""
    layout = Layout.of(monitoring)
    m = int(monitoring.get("rows") or 0)
    judged = rows >= min_rows and m > 0
    features = []
    for i, f in enumerate(monitoring["features"]):
        counts = live[layout.slice(i)]
        ref = np.asarray(f["ref"], dtype=np.float64)
        features.append(_judgement(f["name"], counts, ref, int(ref.sum()), judged, alpha, layout.features * looks))
    outputs = []
    outputs_judged = previous is not None and rows >= min_rows and previous_rows >= min_rows
    for j, o in enumerate(monitoring["outputs"]):
        counts = live[layout.slice(layout.features + j)]
        base = previous[layout.slice(layout.features + j)] if previous is not None else np.zeros_like(counts)
        seen = (counts + base) > 0  # fixed bins neither window reaches carry no information
        outputs.append(
            _judgement(
                o["name"],
                counts[seen],
                base[seen].astype(np.float64),
                int(base.sum()),
                outputs_judged and int(seen.sum()) >= 2,
                alpha,
                len(monitoring["outputs"]) * looks,
            )
        )
    drifted = [f["feature"] for f in features if f["drifted"]]
    return {
        "rows": int(rows),
        "reference_rows": m,
        "judged": judged,
        "alarm": bool(drifted),
        "drifted": drifted,
        "features": features,
        "outputs": outputs,
        "outputs_drifted": [o["feature"] for o in outputs if o["drifted"]],
    }


def _judgement(
    name: str, live: np.ndarray, baseline: np.ndarray, m: int, judged: bool, alpha: float, tests: int
) -> dict[str, Any]:
    n = int(live.sum())
    value = psi(live.astype(np.float64), baseline) if n and m else None
    limit = threshold(n, m, int(live.size), alpha, tests) if judged and n and m else None
    return {
        "feature": name,
        "psi": _round(value),
        "js": _round(js_distance(live.astype(np.float64), baseline)) if n and m else None,
        "threshold": _round(limit),
        "drifted": bool(value is not None and limit is not None and value > limit),
        "rows": n,
        "baseline_rows": m,
        "bins": int(live.size),
    }


def _round(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)
