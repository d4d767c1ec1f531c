"""Worker-side counting: each model call's inputs and outputs into the version's drift bins,
its model metrics (confidence, numeric outputs, labels), and each finished job's traffic.

Everything is aggregated in memory and written at most every ``monitoring_flush_s`` in one
pipeline: per (version, minute) a few HINCRBYs into ``mon:`` hashes that expire after
``monitoring_retention_s`` (``bastion.constants.monitor_bins_key``, ``monitor_traffic_key``),
and the Prometheus children updated once per bucket rather than once per row. An observer
costs a handful of vectorised numpy calls per model call; it never fails the call (an error
is logged and counted, the batch stands). No SQL here: the worker imports this module.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from bastion import logs, metrics
from bastion.constants import STATUS_FAILED, monitor_bins_key, monitor_traffic_key
from bastion.monitoring.bins import LABEL, SCORE, Layout
from bastion.settings import Settings
from bastion.snapshot import VersionInfo

if TYPE_CHECKING:
    from bastion.queue.consumer import Outcome

log = logs.get("bastion.monitoring")

PART = 120  # bins per hash (``monitor_bins_key``): at most 121 fields with "n", under listpack's 128
LATENCY_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000)  # + one bucket above
MAX_LABELS = 64  # distinct label values a version's label counter takes (beyond: "other")


@dataclass(slots=True)
class _Input:
    """One input's features, binned with a single ``searchsorted``: each feature is mapped
    monotonically into its own band ``[2j, 2j + 2)`` (its edges span ``[2j + 0.5, 2j + 1.5]``,
    values beyond them are clipped to the band), so one sorted array holds every feature's edges
    and the index found, plus ``j``, is the bin's place in the flat vector."""

    name: str
    columns: np.ndarray | None  # None: a rank-1 input (one feature)
    low: np.ndarray  # per feature: its lowest edge
    scale: np.ndarray  # per feature: 1 / (highest edge - lowest edge)
    band: np.ndarray  # per feature: 2j + 0.5
    edges: np.ndarray  # every feature's edges, mapped into its band, ascending
    shift: np.ndarray  # per feature: the flat vector's offset of the input's first bin, + j

    @classmethod
    def of(cls, name: str, features: list[dict[str, Any]], first: int) -> _Input:
        low, scale, mapped = [], [], []
        band = np.arange(len(features), dtype=np.float64) * 2 + 0.5
        for j, f in enumerate(features):
            e = np.asarray(f["edges"], dtype=np.float64)
            lo = float(e[0]) if e.size else 0.0
            width = float(e[-1] - e[0]) if e.size > 1 else 1.0
            low.append(lo)
            scale.append(1.0 / width if width > 0 else 1.0)
            mapped.append(_band(e, lo, scale[-1], float(band[j])))
        rank1 = features[0]["column"] is None
        return cls(
            name,
            None if rank1 else np.asarray([f["column"] for f in features], dtype=np.intp),
            np.asarray(low),
            np.asarray(scale),
            band,
            np.concatenate(mapped) if mapped else np.zeros(0),
            first + np.arange(len(features), dtype=np.intp),
        )

    def count(self, value: np.ndarray) -> np.ndarray | None:
        """Flat bin indices of every value of every feature of this input (None: shape mismatch)."""
        x = value.reshape(value.shape[0], -1) if self.columns is not None else value.reshape(-1, 1)
        if self.columns is not None:
            if x.shape[1] <= int(self.columns[-1]) or x.shape[1] < self.columns.size:
                return None
            if x.shape[1] != self.columns.size or int(self.columns[-1]) != self.columns.size - 1:
                x = x[:, self.columns]
        z = _band(x, self.low, self.scale, self.band)
        found: np.ndarray = np.searchsorted(self.edges, z, side="right") + self.shift
        return found.ravel()


def _band(x: np.ndarray, low: Any, scale: Any, band: Any) -> np.ndarray:
    """``x`` mapped monotonically into its feature's band (the same float steps for edges and values)."""
    z: np.ndarray = (x.astype(np.float64, copy=False) - low) * scale
    np.clip(z, -0.25, 1.25, out=z)
    z += band
    return z


@dataclass(slots=True)
class _Output:
    name: str
    kind: str
    offset: int
    edges: np.ndarray | None = None
    classes: int = 0
    column: int | None = None


@dataclass(slots=True)
class Plan:
    """A version's monitoring spec compiled for counting."""

    model: str
    version: int
    digest: str
    size: int
    inputs: list[_Input]
    outputs: list[_Output]
    confidence: tuple[str, int | None] | None
    numeric: list[str]  # float outputs: every value goes to bastion_model_output
    labels: dict[str, tuple[str, ...]]  # integer label outputs -> class names by index

    @classmethod
    def of(cls, info: VersionInfo) -> Plan | None:
        spec = info.monitoring
        if not spec:
            return None
        layout = Layout.of(spec)
        by_input: dict[str, list[int]] = defaultdict(list)
        for i, f in enumerate(spec["features"]):
            by_input[f["input"]].append(i)
        inputs = []
        for name, members in by_input.items():
            if members != list(range(members[0], members[0] + len(members))):
                raise ValueError(f"the features of input {name!r} are not contiguous in the layout")
            inputs.append(_Input.of(name, [spec["features"][i] for i in members], layout.offsets[members[0]]))
        outputs = []
        for j, o in enumerate(spec["outputs"]):
            offset = layout.offsets[layout.features + j]
            if o["kind"] == LABEL:
                outputs.append(_Output(o["output"], LABEL, offset, classes=int(o["classes"])))
            else:
                edges = np.asarray(o["edges"], dtype=np.float64)
                outputs.append(_Output(o["output"], o["kind"], offset, edges=edges, column=o.get("column")))
        conf = spec.get("confidence")
        numeric, labels = [], {}
        for tensor in info.signature.outputs:
            kind = _kind(tensor.dtype)
            if kind == "f":
                numeric.append(tensor.name)
            elif kind in ("i", "u") and len(tensor.shape) <= 2:
                labels[tensor.name] = tensor.labels
        return cls(
            info.model,
            info.version,
            str(spec["digest"]),
            layout.size,
            inputs,
            outputs,
            (conf["output"], conf.get("column")) if conf else None,
            numeric,
            labels,
        )

    def count(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Bin counts of one model call, as the flat vector."""
        flat: list[np.ndarray] = []
        for spec in self.inputs:
            value = inputs.get(spec.name)
            found = spec.count(value) if value is not None and value.ndim else None
            if found is not None:
                flat.append(found)
        for out in self.outputs:
            value = outputs.get(out.name)
            if value is None or not value.size:
                continue
            if out.kind == LABEL:
                v = value.reshape(-1).astype(np.int64, copy=False)
                flat.append(out.offset + np.where((v >= 0) & (v < out.classes), v, out.classes))
                continue
            if out.edges is not None:
                score = _scores(value, out.kind, out.column)
                flat.append(out.offset + np.searchsorted(out.edges, score, side="right"))
        if not flat:
            return np.zeros(self.size, dtype=np.int64)
        return np.bincount(np.concatenate(flat), minlength=self.size).astype(np.int64, copy=False)


def _scores(value: np.ndarray, kind: str, column: int | None) -> np.ndarray:
    scores = value.reshape(value.shape[0], -1).astype(np.float64, copy=False)
    if scores.shape[1] == 1:
        return scores[:, 0]
    if kind == SCORE and column is not None:
        return scores[:, min(column, scores.shape[1] - 1)]
    top: np.ndarray = scores.max(axis=1)
    return top


def _kind(dtype: str) -> str:
    try:
        return str(np.dtype(dtype).kind)
    except TypeError:
        return ""


@dataclass(slots=True)
class _Histogram:
    """Bucket counts of a Prometheus histogram child, added at flush time."""

    bounds: np.ndarray
    counts: np.ndarray
    total: float = 0.0

    @classmethod
    def like(cls, bounds: np.ndarray) -> _Histogram:
        return cls(bounds, np.zeros(bounds.size, dtype=np.int64))

    def add(self, values: np.ndarray) -> None:
        v = values.reshape(-1).astype(np.float64, copy=False)
        self.counts += np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=self.bounds.size)[
            : self.bounds.size
        ]
        self.total += float(v.sum())


@dataclass(slots=True)
class _Models:
    """One (model, version, role)'s model metrics since the last flush."""

    confidence: _Histogram | None = None
    outputs: dict[str, _Histogram] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Observation:
    """Called by ``bastion.worker.batching.run_batch`` once per model call, with the decoded
    inputs and outputs (and the rows of each job, when it knows them)."""

    __slots__ = ("monitor", "plan", "roles")

    def __init__(self, monitor: Monitor, plan: Plan, roles: Sequence[str]) -> None:
        self.monitor = monitor
        self.plan = plan
        self.roles = roles

    def __call__(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], rows: Sequence[int] | None = None
    ) -> None:
        try:
            self.monitor.observe(self.plan, self.roles, inputs, outputs, rows)
        except Exception as exc:  # monitoring never fails a batch
            metrics.ERRORS.labels("worker", "monitoring").inc()
            log.warning("monitoring_observe_failed", model=self.plan.model, error_type=type(exc).__name__)


class Monitor:
    """A worker's monitoring counts, in memory until ``flush``."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.enabled = settings.monitoring
        self._plans: dict[tuple[str, int, str], Plan | None] = {}
        self._bins: dict[tuple[str, int, int, str], list[Any]] = {}  # -> [counts, rows]
        self._traffic: dict[tuple[str, int, int], dict[str, int]] = {}
        self._models: dict[tuple[str, int, str], _Models] = {}
        self._fields: dict[str, tuple[str, ...]] = {}  # role -> its traffic fields
        # (model, version, role) -> label values given a Prometheus child so far: kept across
        # flushes, so that a model answering ever new integers adds at most MAX_LABELS children
        self._label_values: dict[tuple[str, int, str], set[str]] = {}
        self._next_flush = 0.0
        self._conf_bounds = np.asarray(_bounds(metrics.PREDICTION_CONFIDENCE), dtype=np.float64)
        self._output_bounds = np.asarray(_bounds(metrics.MODEL_OUTPUT), dtype=np.float64)

    # counting ----------------------------------------------------------------------------
    def observer(self, info: VersionInfo | None, roles: Sequence[str]) -> Observation | None:
        """An observer for one model call of ``info``'s version on jobs of these ``roles``
        (None when monitoring is off, or the snapshot has no monitoring spec for the version)."""
        if not self.enabled or info is None or not info.monitoring:
            return None
        digest = str(info.monitoring.get("digest", ""))
        key = (info.model, info.version, digest)
        if key not in self._plans:
            try:
                self._plans[key] = Plan.of(info)
            except Exception as exc:  # a spec this worker cannot read costs its counts, never the jobs' call
                log.warning(
                    "monitoring_spec_unreadable", model=info.model, version=info.version, error_type=type(exc).__name__
                )
                self._plans[key] = None
        plan = self._plans[key]
        return Observation(self, plan, roles) if plan is not None else None

    def observe(
        self,
        plan: Plan,
        roles: Sequence[str],
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        rows: Sequence[int] | None = None,
    ) -> None:
        minute = int(self.clock() // 60)
        counts = plan.count(inputs, outputs)
        n = _rows(inputs, outputs)
        acc = self._bins.get((plan.model, plan.version, minute, plan.digest))
        if acc is None:
            self._bins[(plan.model, plan.version, minute, plan.digest)] = [counts, n]
        else:
            acc[0] += counts
            acc[1] += n
        if len(set(roles)) <= 1 or rows is None or sum(rows) != n or len(rows) != len(roles):
            self._model_metrics(plan, roles[0] if roles else "primary", outputs)
            return
        per_row = np.repeat(np.asarray(list(roles)), np.asarray(rows))
        for role in set(roles):
            mask = per_row == role
            self._model_metrics(plan, role, {k: v[mask] for k, v in outputs.items() if v.ndim and v.shape[0] == n})

    def _model_metrics(self, plan: Plan, role: str, outputs: dict[str, np.ndarray]) -> None:
        m = self._models.get((plan.model, plan.version, role))
        if m is None:
            m = self._models[(plan.model, plan.version, role)] = _Models()
        if plan.confidence is not None and plan.confidence[0] in outputs:
            name, column = plan.confidence
            if m.confidence is None:
                m.confidence = _Histogram.like(self._conf_bounds)
            m.confidence.add(_scores(outputs[name], SCORE if column is not None else "confidence", column))
        for name in plan.numeric:
            value = outputs.get(name)
            if value is not None and value.size:
                h = m.outputs.get(name)
                if h is None:
                    h = m.outputs[name] = _Histogram.like(self._output_bounds)
                h.add(value)
        for name, names in plan.labels.items():
            value = outputs.get(name)
            if value is None or not value.size:
                continue
            flat = value.reshape(-1)
            if flat.dtype.kind in "iu" and 0 <= int(flat.min()) and int(flat.max()) < MAX_LABELS:
                times = np.bincount(flat)
                found = np.flatnonzero(times)
                times = times[found]
            else:
                found, times = np.unique(flat, return_counts=True)
            seen = self._label_values.setdefault((plan.model, plan.version, role), set())
            for v, t in zip(found.tolist(), times.tolist(), strict=True):
                label = _label(v, names, seen)
                seen.add(label)
                m.labels[label] += int(t)

    def finished(self, outcomes: Sequence[Outcome]) -> None:
        """Count finished jobs per (version, role, minute): jobs, rows, failures and the latency
        from enqueue to now (``Job.created_ms``), for ``MonitoringService.traffic``."""
        if not self.enabled or not outcomes:
            return
        try:
            now = self.clock()
            minute, now_ms = int(now // 60), now * 1000
            for o in outcomes:
                job = o.job
                if job.evaluation:
                    continue
                t = self._traffic.get((job.model, job.version, minute))
                if t is None:
                    t = self._traffic[(job.model, job.version, minute)] = defaultdict(int)
                names = self._fields.get(job.role)
                if names is None:
                    names = self._fields[job.role] = _traffic_fields(job.role)
                t[names[0]] += 1
                t[names[1]] += max(job.rows, 1)
                if o.status == STATUS_FAILED:
                    t[names[2]] += 1
                if job.created_ms:
                    t[names[3 + _latency_bucket(now_ms - job.created_ms)]] += 1
        except Exception as exc:
            metrics.ERRORS.labels("worker", "monitoring").inc()
            log.warning("monitoring_count_failed", error_type=type(exc).__name__)

    # writing -----------------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        """Write what was counted in one pipeline (at most every ``monitoring_flush_s``, unless
        ``force``); on a Redis error the counts are kept for the next flush."""
        if not self.enabled:
            return
        now = self.clock()
        if not force and now < self._next_flush:
            return
        self._next_flush = now + self.settings.monitoring_flush_s
        self._flush_metrics()
        if not self._bins and not self._traffic:
            return
        bins, traffic = self._bins, self._traffic
        self._bins, self._traffic = {}, {}
        ttl = self.settings.monitoring_retention_s
        pipe = self.client.pipeline(transaction=False)
        for (model, version, minute, digest), (counts, rows) in bins.items():
            touched: set[int] = set()
            for i in np.flatnonzero(counts).tolist():
                part = i // PART
                pipe.hincrby(monitor_bins_key(model, version, minute, digest, part), str(i % PART), int(counts[i]))
                touched.add(part)
            pipe.hincrby(monitor_bins_key(model, version, minute, digest, 0), "n", int(rows))
            for part in touched | {0}:
                pipe.expire(monitor_bins_key(model, version, minute, digest, part), ttl)
        for (model, version, minute), fields in traffic.items():
            key = monitor_traffic_key(model, version, minute)
            for name, value in fields.items():
                pipe.hincrby(key, name, value)
            pipe.expire(key, ttl)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            self._keep(bins, traffic, now)
            metrics.ERRORS.labels("worker", "monitoring").inc()
            log.warning("monitoring_flush_failed", error_type=type(exc).__name__)

    def _keep(
        self,
        bins: dict[tuple[str, int, int, str], list[Any]],
        traffic: dict[tuple[str, int, int], dict[str, int]],
        now: float,
    ) -> None:
        """Put unwritten counts back (dropping minutes that would have expired by now)."""
        oldest = int((now - self.settings.monitoring_retention_s) // 60)
        for key, (counts, rows) in bins.items():
            if key[2] < oldest:
                continue
            acc = self._bins.get(key)
            if acc is None:
                self._bins[key] = [counts, rows]
            else:
                acc[0] += counts
                acc[1] += rows
        for tkey, fields in traffic.items():
            if tkey[2] < oldest:
                continue
            t = self._traffic.setdefault(tkey, defaultdict(int))
            for name, value in fields.items():
                t[name] += value

    def _flush_metrics(self) -> None:
        models, self._models = self._models, {}
        for (model, version, role), m in models.items():
            v = str(version)
            if m.confidence is not None:
                _add(metrics.PREDICTION_CONFIDENCE.labels(model, v, role), m.confidence)
            for name, h in m.outputs.items():
                _add(metrics.MODEL_OUTPUT.labels(model, v, role, name), h)
            for label, times in m.labels.items():
                metrics.PREDICTED_LABELS.labels(model, v, role, label).inc(times)


def _rows(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> int:
    for values in (*outputs.values(), *inputs.values()):
        if values.ndim:
            return int(values.shape[0])
    return 1


def _label(value: Any, names: tuple[str, ...], seen: set[str]) -> str:
    label = names[value] if isinstance(value, int) and 0 <= value < len(names) else str(value)[:64]
    if label not in seen and len(seen) >= MAX_LABELS:
        return "other"
    return label


def _traffic_fields(role: str) -> tuple[str, ...]:
    """A role's fields in the traffic hash: jobs, rows, failures, then one per latency bucket."""
    return (f"j:{role}", f"r:{role}", f"f:{role}", *(f"l:{role}:{i}" for i in range(len(LATENCY_MS) + 1)))


def _latency_bucket(ms: float) -> int:
    return bisect.bisect_left(LATENCY_MS, ms)


def _bounds(histogram: Any) -> list[float]:
    """A histogram's upper bounds (the last is +Inf), as prometheus_client keeps them."""
    return [float(b) for b in histogram._upper_bounds]


def _add(child: Any, h: _Histogram) -> None:
    """Add bucket counts to a histogram child at once (``observe`` per row would take its lock
    once per value); prometheus_client keeps per-bucket (not cumulative) values in ``_buckets``."""
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if buckets is None or total is None or len(buckets) != h.counts.size:
        return
    for i in np.flatnonzero(h.counts).tolist():
        buckets[i].inc(int(h.counts[i]))
    total.inc(h.total)
