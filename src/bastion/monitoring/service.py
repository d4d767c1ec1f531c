"""The control plane's model monitoring: drift bins for the snapshot, the drift judgement and its
gauges, the monitoring report (``GET /admin/v1/models/{name}/monitoring``) and per-version
traffic for ``bastion status``; feedback labels and live accuracy are ``FeedbackDesk``'s.

Bins are computed here once per version (versions are immutable) from its reference sample in
the artifact store, and attached to every snapshot published (``annotate``); workers count into
them (``bastion.monitoring.counting``). Closed minutes read from Redis are kept in memory
(they no longer change), so a judgement every ``drift_interval_s`` reads only the current and the
previous minute of each version.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import redis

from bastion import logs, metrics
from bastion.constants import monitor_bins_key, monitor_traffic_key
from bastion.errors import BastionError
from bastion.monitoring import bins, drift
from bastion.monitoring.counting import LATENCY_MS, PART
from bastion.monitoring.feedback import FeedbackDesk
from bastion.registry.db import Sessions
from bastion.registry.service import Registry
from bastion.settings import Settings
from bastion.signature import Signature

log = logs.get("bastion.monitoring")

_CLOSED_AFTER_S = 5.0  # a minute is final this long after it ends, plus two worker flush periods
_NONE: dict[str, Any] = {}


class MonitoringService:
    def __init__(self, settings: Settings, sessions: Sessions, client: redis.Redis, registry: Registry) -> None:
        self.settings = settings
        self.sessions = sessions
        self.client = client
        self.registry = registry
        self.feedback = FeedbackDesk(settings, sessions, client)
        self.clock = time.time
        self.counts = MinuteCounts(client, settings, lambda: self.clock())
        self._specs: dict[tuple[str, int, str], dict[str, Any] | None] = {}
        self._gauged: dict[str, set[tuple[str, str]]] = {}  # model -> (version, feature) gauges set

    # bins for the snapshot -----------------------------------------------------------------
    def spec(self, model: str, version: int, sha256: str) -> dict[str, Any] | None:
        """The version's monitoring spec (``bins.spec``), computed once per process."""
        key = (model, version, sha256)
        if key in self._specs:
            return self._specs[key]
        found: dict[str, Any] | None = None
        try:
            view = self.registry.get_version(model, version)
            meta = view.get("metadata") or {}
            reference = meta.get("reference")
            sample = orjson.loads(self.registry.store.open(reference["sha256"])) if reference else None
            signature = Signature.from_dict(view["signature"])
            found = bins.spec(signature, sample, self.settings.monitoring_bins, meta.get("postprocessing"))
        except (BastionError, KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
            log.warning("monitoring_spec_failed", model=model, version=version, error_type=type(exc).__name__)
        self._specs[key] = found
        return found

    def annotate(self, data: dict[str, Any]) -> dict[str, Any]:
        """Attach each version's monitoring spec to a snapshot read by ``Registry.snapshot``
        (a version whose spec cannot be made is shipped without one: it is not monitored)."""
        if not self.settings.monitoring:
            return data
        for name, model in data.get("models", {}).items():
            for number, v in model.get("versions", {}).items():
                try:
                    found = self.spec(name, int(number), v["sha256"])
                except Exception as exc:  # SQL away: the snapshot goes out; the spec comes next time
                    log.warning("monitoring_spec_failed", model=name, version=number, error_type=type(exc).__name__)
                    continue
                if found is not None:
                    v["monitoring"] = found
        return data

    # the report ----------------------------------------------------------------------------
    def report(self, model: str, window_s: int) -> dict[str, Any]:
        """Drift per routed version (features against the reference, outputs against the window
        before) side by side, with traffic and live quality: the monitoring route's body."""
        found = self.registry.get_model(model)  # NotFound: 404
        dep = found["deployment"]
        roles: dict[int, list[str]] = {}
        weights: dict[int, int] = {}
        for r in dep["routes"]:
            roles.setdefault(int(r["version"]), []).append(str(r["role"]))
            weights[int(r["version"])] = weights.get(int(r["version"]), 0) + int(r.get("weight", 0))
        if dep["fallback_version"] is not None:
            roles.setdefault(int(dep["fallback_version"]), []).append("fallback")
        views = {int(v["version"]): v for v in found["versions"]}
        traffic = self.traffic(model, window_s, list(roles))
        quality = self.feedback.quality(model, self.settings.accuracy_window_s)
        now = self.clock()
        looks = drift.looks(window_s, self.settings.drift_interval_s)
        versions = []
        for number in sorted(roles):
            view = views.get(number)
            spec = self.spec(model, number, view["sha256"]) if view is not None else None
            entry: dict[str, Any] = {
                "version": number,
                "roles": roles[number],
                "weight": weights.get(number, 0),
                "stage": view["stage"] if view is not None else None,
                "reference": bool(spec and spec["features"]),
            }
            if spec is not None:
                entry.update(self.counts.judge(model, number, spec, window_s, now, looks))
            else:
                entry.update({"rows": 0, "judged": False, "alarm": False, "drifted": [], "features": [], "outputs": []})
            entry["traffic"] = traffic.get(number, _NONE) or None
            entry["quality"] = quality.get(number)
            versions.append(entry)
        return {
            "model": model,
            "window_s": window_s,
            "alpha": self.settings.drift_alpha,
            "min_rows": self.settings.drift_min_rows,
            "looks": looks,
            "threshold": "chi-square null of PSI: (1/n + 1/m) * chi2.ppf(1 - alpha / (features * looks), bins - 1)",
            "versions": versions,
        }

    # traffic -------------------------------------------------------------------------------
    def traffic(self, model: str, window_s: int, versions: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """Per version over the last ``window_s``: jobs, failed, rows, req_per_s, p50_ms, p99_ms,
        error_rate and the same per role (``roles``), from the workers' per-minute counts.
        ``versions`` unset: those routed now (and the fallback)."""
        if versions is None:
            dep = self.registry.deployments.get(model)
            versions = sorted({int(r["version"]) for r in dep["routes"]} | ({dep["fallback_version"]} - {None}))
        now = self.clock()
        last = int(now // 60)
        span = max(1, window_s // 60)
        elapsed = max((span - 1) * 60 + (now - last * 60), 1.0)
        pipe = self.client.pipeline(transaction=False)
        for version in versions:
            for minute in range(last - span + 1, last + 1):
                pipe.hgetall(monitor_traffic_key(model, version, minute))
        found = pipe.execute()
        out: dict[int, dict[str, Any]] = {}
        for i, version in enumerate(versions):
            fields: dict[str, int] = {}
            for raw in found[i * span : (i + 1) * span]:
                for k, v in raw.items():
                    name = k.decode()
                    fields[name] = fields.get(name, 0) + int(v)
            if not fields:
                continue
            by_role = _by_role(fields)
            summed = _summed(by_role.values(), elapsed)
            summed["roles"] = {role: _summed([t], elapsed) for role, t in sorted(by_role.items())}
            out[version] = summed
        return out

    # the judging loop ----------------------------------------------------------------------
    async def judge(self) -> None:
        """Every ``drift_interval_s``: judge each model's routed versions over ``drift_window_s``
        and set the drift and live-accuracy gauges."""
        while True:
            await asyncio.sleep(self.settings.drift_interval_s)
            if not self.settings.monitoring:
                self.counts.forget(int(self.clock() // 60))  # what admin reports read meanwhile
                continue
            try:
                await asyncio.to_thread(self.judge_once)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or SQL away: next period
                log.warning("drift_judge_failed", error_type=type(exc).__name__)

    def judge_once(self) -> dict[str, dict[str, Any]]:
        """One judgement of every model (the gauges set); the reports by model."""
        reports = {}
        try:
            for model in self.registry.list_models():
                name = model["name"]
                try:
                    report = self.report(name, self.settings.drift_window_s)
                except BastionError as exc:  # deleted meanwhile, say: the other models are still judged
                    log.warning("drift_judge_model_failed", model=name, error_type=type(exc).__name__)
                    continue
                reports[name] = report
                self._gauge(name, report)
        finally:  # minutes kept by admin reports go too, whatever failed
            self.counts.forget(int(self.clock() // 60))
        return reports

    def _gauge(self, model: str, report: dict[str, Any]) -> None:
        seen: set[tuple[str, str]] = set()
        for v in report["versions"]:
            version = str(v["version"])
            metrics.DRIFT_ALARM.labels(model, version).set(1 if v["alarm"] else 0)
            seen.add((version, ""))
            for f in [*v["features"], *v["outputs"]]:
                if f["psi"] is not None:
                    metrics.DRIFT_PSI.labels(model, version, f["feature"]).set(f["psi"])
                    seen.add((version, f["feature"]))
                if f["threshold"] is not None:
                    metrics.DRIFT_THRESHOLD.labels(model, version, f["feature"]).set(f["threshold"])
            quality = v.get("quality") or {}
            for role, figures in (quality.get("by_role") or {}).items():
                accuracy = (figures.get("accuracy") or {}).get("value")
                if accuracy is not None:
                    metrics.LIVE_ACCURACY.labels(model, version, role).set(accuracy)
                metrics.LIVE_LABELS.labels(model, version, role).set(figures.get("labels", 0))
        for version, feature in self._gauged.get(model, set()) - seen:  # versions routed away
            for gauge in (metrics.DRIFT_PSI, metrics.DRIFT_THRESHOLD) if feature else (metrics.DRIFT_ALARM,):
                try:
                    gauge.remove(model, version, feature) if feature else gauge.remove(model, version)
                except KeyError:
                    pass
        self._gauged[model] = seen


class MinuteCounts:
    """Reads a version's drift counts from the workers' minute hashes and judges them; closed
    minutes (final once ``_CLOSED_AFTER_S`` and two flush periods past their end; a worker that
    could not reach Redis for longer adds its late counts to the hash, which only a fresh reader
    sees) are kept in memory."""

    def __init__(self, client: redis.Redis, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self._minutes: dict[tuple[str, int, str, int], tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()  # the judging loop and admin requests share the minutes kept

    def judge(
        self, model: str, version: int, spec: dict[str, Any], window_s: int, now: float, looks: int
    ) -> dict[str, Any]:
        """Features over the window ending in ``now``'s minute, outputs against the window before."""
        last = int(now // 60)
        span = max(1, window_s // 60)
        live, rows = self.window(model, version, spec, last - span + 1, last)
        previous, previous_rows = self.window(model, version, spec, last - 2 * span + 1, last - span)
        s = self.settings
        return drift.judge(spec, live, rows, s.drift_alpha, s.drift_min_rows, previous, previous_rows, looks)

    def window(
        self, model: str, version: int, monitoring: dict[str, Any], first: int, last: int
    ) -> tuple[np.ndarray, int]:
        """Summed bin counts and rows of minutes ``first..last`` (closed minutes from memory)."""
        digest, size = str(monitoring["digest"]), bins.Layout.of(monitoring).size
        parts = max(1, math.ceil(size / PART))
        total, rows = np.zeros(size, dtype=np.int64), 0
        settle = _CLOSED_AFTER_S + 2 * self.settings.monitoring_flush_s
        closed = int((self.clock() - settle) // 60)  # minutes before this one are final
        wanted = []
        for minute in range(first, last + 1):
            with self._lock:
                kept = self._minutes.get((model, version, digest, minute))
            if kept is not None:
                total += kept[0]
                rows += kept[1]
            else:
                wanted.append(minute)
        if wanted:
            pipe = self.client.pipeline(transaction=False)
            for minute in wanted:
                for part in range(parts):
                    pipe.hgetall(monitor_bins_key(model, version, minute, digest, part))
            found = pipe.execute()
            for i, minute in enumerate(wanted):
                counts, n = _parse_bins(found[i * parts : (i + 1) * parts], size)
                total += counts
                rows += n
                if minute < closed:
                    with self._lock:
                        self._minutes[(model, version, digest, minute)] = (counts, n)
        return total, rows

    def forget(self, now_minute: int) -> None:
        oldest = now_minute - 2 * max(self.settings.drift_window_s, 60) // 60 - 2
        with self._lock:
            for key in [k for k in self._minutes if k[3] < oldest]:
                del self._minutes[key]


def _parse_bins(hashes: list[dict[bytes, bytes]], size: int) -> tuple[np.ndarray, int]:
    counts = np.zeros(size, dtype=np.int64)
    rows = 0
    for part, raw in enumerate(hashes):
        for k, v in raw.items():
            if k == b"n":
                rows += int(v)
                continue
            i = part * PART + int(k)
            if i < size:
                counts[i] += int(v)
    return counts, rows


def _by_role(fields: dict[str, int]) -> dict[str, dict[str, Any]]:
    roles: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        kind, _, rest = name.partition(":")
        role, _, bucket = rest.partition(":")
        t = roles.setdefault(role, {"jobs": 0, "rows": 0, "failed": 0, "latency": [0] * (len(LATENCY_MS) + 1)})
        if kind == "j":
            t["jobs"] += value
        elif kind == "r":
            t["rows"] += value
        elif kind == "f":
            t["failed"] += value
        elif kind == "l" and bucket.isdigit() and int(bucket) <= len(LATENCY_MS):
            t["latency"][int(bucket)] += value
    return roles


def _summed(parts: Any, elapsed_s: float) -> dict[str, Any]:
    jobs = rows = failed = 0
    latency = [0] * (len(LATENCY_MS) + 1)
    for t in parts:
        jobs += t["jobs"]
        rows += t["rows"]
        failed += t["failed"]
        latency = [a + b for a, b in zip(latency, t["latency"], strict=True)]
    return {
        "jobs": jobs,
        "rows": rows,
        "failed": failed,
        "error_rate": failed / jobs if jobs else None,
        "req_per_s": round(jobs / elapsed_s, 3),
        "p50_ms": _quantile(latency, 0.5),
        "p99_ms": _quantile(latency, 0.99),
        "latency_buckets_ms": {str(b): c for b, c in zip([*LATENCY_MS, "inf"], latency, strict=True) if c},
    }


def _quantile(buckets: list[int], q: float) -> float | None:
    """A quantile of the latency histogram, interpolated inside its bucket (Prometheus's way)."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen = q * total, 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = LATENCY_MS[i - 1] if i else 0.0
            high = LATENCY_MS[i] if i < len(LATENCY_MS) else LATENCY_MS[-1]
            return round(low + (high - low) * (rank - seen) / count, 3)
        seen += count
    return float(LATENCY_MS[-1])
