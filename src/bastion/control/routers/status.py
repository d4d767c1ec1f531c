"""The installation at a glance, for ``bastion status``: gateways, workers, and each model's
versions with their traffic share, request rate, latency, error rate, queue depth, drift alarm and
live accuracy.

Where each figure comes from (nothing here is a figure of its own):

- gateways: the ``gateways`` sorted set, where each live gateway beats every ``GATEWAY_BEAT_S``
  (``gateway/replies.py``, with its reply stream's TTL), so a crashed one drops out within
  ``GATEWAY_STALE_S``; then each one's reply stream ``r:{id}``;
- workers: the consumers of the ``workers`` group on each model's sync stream (``idle``: time
  since the worker last read or touched a job; alive while under the visibility timeout) and the
  ``warm:{model}:{version}`` sets of the versions each has loaded;
- traffic (jobs, req/s, p50/p99, failures per version and role): ``MonitoringService.traffic``
  over the window (the workers' per-minute counts);
- drift alarm: the control plane's latest judgement (the ``bastion_drift_alarm`` gauge, which
  Prometheus alerts on too); live accuracy: ``FeedbackDesk.quality`` over ``accuracy_window_s``,
  read again at most every ``drift_interval_s`` (``QualityCache``).

A worker is alive while its idle time is under max(10 s, ``visibility_timeout_s``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import redis
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion import metrics
from bastion.constants import (
    CONSUMER_GROUP,
    GATEWAY_STALE_S,
    GATEWAYS_KEY,
    LANE_SYNC,
    LANES,
    REPLY_PREFIX,
    queue_key,
    warm_key,
)
from bastion.control.plane import ControlPlane, plane_of, redis_errors
from bastion.control.principals import needs
from bastion.errors import InvalidInput
from bastion.responses import json_response
from bastion.timefmt import iso_utc

router = APIRouter()
_UNAVAILABLE = "the status is unavailable"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_WINDOW = re.compile(r"([0-9]{1,6})([smhd])")
_MIN_WINDOW_S = 60  # traffic is counted in one-minute buckets


def window_seconds(text: str, longest_s: int) -> int:
    """``30s``, ``5m``, ``1h``, ``1d`` -> seconds, between one minute and ``longest_s``; else ``InvalidInput``."""
    found = _WINDOW.fullmatch(text)  # (a trailing newline is no duration either)
    if found is None:
        raise InvalidInput(f"window {text[:40]!r} is not a duration such as 5m, 1h or 1d")
    seconds = int(found.group(1)) * _UNITS[found.group(2)]
    if not _MIN_WINDOW_S <= seconds <= longest_s:
        raise InvalidInput(f"window must be between 1m and {longest_s}s (monitoring_retention_s), not {text}")
    return seconds


@router.get("/status", tags=["status"], **needs("models:read"))
async def status(
    request: Request,
    window: str = Query(default="5m", max_length=16, description="traffic window: 1m to monitoring_retention_s"),
    model: str | None = Query(default=None, max_length=64, description="only this model"),
) -> Response:
    """Gateways, workers, and per model and version: traffic share (configured weight and observed),
    req/s, p50/p99 ms, error rate, queue depth, drift alarm and live accuracy over ``window``."""
    plane = plane_of(request)
    window_s = window_seconds(window, plane.settings.monitoring_retention_s)
    state = request.app.state
    if not hasattr(state, "status_quality"):
        state.status_quality = QualityCache(plane)
    return json_response(await run_in_threadpool(snapshot, plane, window_s, model, state.status_quality))


class QualityCache:
    """Live quality per model, read again at most every ``drift_interval_s`` (as often as the
    control plane refreshes the live-accuracy gauges): a status view refreshing every second or
    two would otherwise read the accuracy window's labels from SQL each time."""

    def __init__(self, plane: ControlPlane, clock: Callable[[], float] = time.monotonic) -> None:
        self.plane = plane
        self.clock = clock
        self.every_s = plane.settings.drift_interval_s
        self._found: dict[str, tuple[float, dict[int, dict[str, Any]]]] = {}

    def quality(self, model: str) -> dict[int, dict[str, Any]]:
        now = self.clock()
        cached = self._found.get(model)
        if cached is not None and now - cached[0] < self.every_s:
            return cached[1]
        found = self.plane.monitoring.feedback.quality(model, self.plane.settings.accuracy_window_s)
        self._found = {m: c for m, c in self._found.items() if now - c[0] < self.every_s}  # models deleted since
        self._found[model] = (now, found)
        return found


def snapshot(
    plane: ControlPlane, window_s: int, only: str | None = None, quality: QualityCache | None = None
) -> dict[str, Any]:
    """The status body (``GET /admin/v1/status``); ``only``: one model (unknown: ``NotFound``)."""
    quality = quality or QualityCache(plane)
    models = [plane.registry.get_model(only)] if only else plane.registry.list_models()
    deployments = {m["name"]: plane.registry.deployments.get(m["name"]) for m in models}
    alarms = _alarms()
    with redis_errors(_UNAVAILABLE):
        gateways = _gateways(plane.redis)
        workers = _workers(plane, deployments)
        depths = _depths(plane.redis, list(deployments))
        shown = [
            _model(plane, m, deployments[m["name"]], depths[m["name"]], alarms, quality.quality(m["name"]), window_s)
            for m in models
        ]
    return {"at": iso_utc(time.time()), "window_s": window_s, "gateways": gateways, "workers": workers, "models": shown}


def _gateways(client: redis.Redis) -> list[dict[str, Any]]:
    """Each live gateway (``GATEWAYS_KEY``: each beats every ``GATEWAY_BEAT_S``), with its reply
    stream: replies not yet trimmed, when it last got one. No keyspace scan."""
    alive: list[bytes] = client.zrangebyscore(GATEWAYS_KEY, time.time() - GATEWAY_STALE_S, "+inf")  # type: ignore[assignment]
    keys = sorted(f"{REPLY_PREFIX}{member.decode()}".encode() for member in alive)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
        pipe.xinfo_stream(key)
    found = pipe.execute(raise_on_error=False)
    out = []
    for i, key in enumerate(keys):
        ttl, info = found[2 * i], found[2 * i + 1]
        if isinstance(ttl, Exception) or isinstance(info, Exception) or ttl == -2:
            continue  # gone between the scan and the read
        last_ms = int(str(_text(info.get("last-generated-id", "0-0"))).partition("-")[0] or 0)
        out.append(
            {
                "id": key.decode()[len(REPLY_PREFIX) :],
                "expires_in_s": ttl if ttl >= 0 else None,
                "replies_buffered": int(info.get("length", 0)),
                "last_reply_at": iso_utc(last_ms / 1000) if last_ms else None,
            }
        )
    return out


def _workers(plane: ControlPlane, deployments: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Workers as the consumer groups see them, with the versions each reports warm."""
    client, names = plane.redis, list(deployments)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xinfo_consumers(queue_key(name, LANE_SYNC), CONSUMER_GROUP)
    versions = [(name, v) for name, dep in deployments.items() for v in _routed(dep)]
    for name, version in versions:
        pipe.zrange(warm_key(name, version), 0, -1, withscores=True)
    found = pipe.execute(raise_on_error=False)
    alive_under_s = max(10.0, plane.settings.visibility_timeout_s)
    workers: dict[str, dict[str, Any]] = {}
    for name, consumers in zip(names, found[: len(names)], strict=True):
        if isinstance(consumers, Exception):  # NOGROUP: no worker has served the model yet
            continue
        for consumer in consumers:
            who = str(_text(consumer["name"]))
            idle_s = int(consumer.get("idle", 0)) / 1000
            entry = workers.setdefault(who, {"name": who, "idle_s": idle_s, "pending": 0, "models": [], "warm": []})
            entry["idle_s"] = min(entry["idle_s"], idle_s)
            entry["pending"] += int(consumer.get("pending", 0))
            entry["models"].append(name)
    for (name, version), warm in zip(versions, found[len(names) :], strict=True):
        if isinstance(warm, Exception):
            continue
        for who, _at in warm:
            entry = workers.setdefault(
                _text(who), {"name": _text(who), "idle_s": None, "pending": 0, "models": [], "warm": []}
            )
            entry["warm"].append(f"{name}:{version}")
    for entry in workers.values():
        entry["alive"] = entry["idle_s"] is not None and entry["idle_s"] <= alive_under_s
        entry["idle_s"] = None if entry["idle_s"] is None else round(entry["idle_s"], 1)
    return sorted(workers.values(), key=lambda w: (not w["alive"], w["name"]))


def _depths(client: redis.Redis, names: list[str]) -> dict[str, dict[str, int]]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        for lane in LANES:
            pipe.xlen(queue_key(name, lane))
    found = iter(pipe.execute())
    return {name: {lane: int(next(found)) for lane in LANES} for name in names}


def _model(
    plane: ControlPlane,
    model: dict[str, Any],
    dep: dict[str, Any],
    depth: dict[str, int],
    alarms: dict[tuple[str, str], float],
    quality: dict[int, dict[str, Any]],
    window_s: int,
) -> dict[str, Any]:
    name = model["name"]
    traffic = plane.monitoring.traffic(name, window_s)
    routes = {int(r["version"]): r for r in dep["routes"]}
    weighed = sum(int(r.get("weight", 0)) for r in routes.values() if r.get("role") != "shadow")
    answered = {v: _answered(t) for v, t in traffic.items()}  # shadow copies answer nobody: no share
    answered_total = sum(answered.values())
    shown = sorted(set(routes) | set(traffic) | ({dep["fallback_version"]} - {None}))
    versions = []
    for version in shown:
        route, seen, graded = routes.get(version, {}), traffic.get(version, {}), quality.get(version, {})
        jobs, failed = int(seen.get("jobs", 0)), int(seen.get("failed", 0))
        role = route.get("role") or ("fallback" if version == dep["fallback_version"] else None)
        weight = int(route.get("weight", 0)) if route else 0
        alarm = alarms.get((name, str(version)))
        versions.append(
            {
                "version": version,
                "role": role,
                "weight": weight,
                "weight_share": weight / weighed if weighed and role != "shadow" else None,
                "traffic_share": answered.get(version, 0) / answered_total if answered_total else None,
                "jobs": jobs,
                "req_per_s": seen.get("req_per_s"),
                "p50_ms": seen.get("p50_ms"),
                "p99_ms": seen.get("p99_ms"),
                "error_rate": failed / jobs if jobs else None,
                "drift_alarm": None if alarm is None else alarm >= 1,
                "live_accuracy": graded.get("accuracy") or None,
                "labels": int(graded.get("labels", 0)),
            }
        )
    return {
        "name": name,
        "enabled": not dep.get("disabled", False),
        "queue_depth": depth,
        "versions": versions,
    }


def _answered(traffic: dict[str, Any]) -> int:
    """A version's jobs over the window that answered callers (every role but shadow)."""
    roles = traffic.get("roles") or {}
    shadow = int((roles.get("shadow") or {}).get("jobs", 0))
    return int(traffic.get("jobs", 0)) - shadow


def _routed(dep: dict[str, Any]) -> list[int]:
    found = {int(r["version"]) for r in dep["routes"]} | ({dep["fallback_version"]} - {None})
    return sorted(found)


def _alarms() -> dict[tuple[str, str], float]:
    """This process's drift alarm gauges (the control plane's judge sets them), by (model, version)."""
    out: dict[tuple[str, str], float] = {}
    for family in metrics.DRIFT_ALARM.collect():
        for sample in family.samples:
            out[(sample.labels["model"], sample.labels["version"])] = float(sample.value)
    return out


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value
