"""The control plane's services, wired once per process: registry (SQL), Redis, artifact store,
the decision log (``audit``: ``bastion.audit.service.AuditService``, on the same database) and
model monitoring (``monitoring``: ``bastion.monitoring.service.MonitoringService``: drift, traffic,
feedback labels and live accuracy).

Handlers reach it through ``plane_of(request)``. Every Redis call the admin API makes goes
through ``redis_errors``: an unreachable Redis is a 503 problem saying what is unavailable, in
this one place.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from starlette.requests import Request

from bastion import logs, snapshot
from bastion.artifacts.sandbox import SandboxedCheck
from bastion.artifacts.store import ArtifactStore
from bastion.audit.service import AuditService
from bastion.constants import TERMINAL_STATUSES, job_key, shadow_key, warm_key
from bastion.control import tokenizers
from bastion.errors import Overloaded, Unavailable
from bastion.monitoring.service import MonitoringService
from bastion.queue.producer import enqueue_evaluation
from bastion.redisconn import sync_client
from bastion.registry import db
from bastion.registry.limits import parse_tiers
from bastion.registry.service import ROUTED_GRACE_S, Registry
from bastion.security import tls
from bastion.settings import Settings

log = logs.get("bastion.control")


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn a Redis failure inside the block into ``Unavailable`` (503): '<what>: Redis is unreachable'."""
    try:
        yield
    except redis.RedisError as exc:
        raise Unavailable(f"{what}: Redis is unreachable") from exc


class ControlPlane:
    """The control plane's services, wired once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        engine = db.engine_for(settings.resolved_database_url)
        db.migrate(engine)
        self.engine = engine
        check = SandboxedCheck(settings.artifact_check_memory_mb, settings.artifact_check_timeout_s)
        self.registry = Registry(
            db.session_factory(engine),
            ArtifactStore(settings.resolved_artifact_dir),
            settings.max_upload_bytes,
            tiers=parse_tiers(settings.rate_tiers),
            default_tier=settings.default_tier,
            check=check,
            text_check=check.text,
            tokenizer_check=check.tokenizer,
            max_metadata_bytes=settings.max_metadata_bytes,
            max_tokenizer_bytes=settings.max_tokenizer_bytes,
            # a version routed away keeps serving the jobs queued for it as long as their state lives
            routed_grace_s=max(ROUTED_GRACE_S, float(settings.result_ttl_s)),
        )
        self.redis = sync_client(
            settings.require_redis_url(), tls.files_of(settings), socket_connect_timeout=2, socket_timeout=5
        )
        self.audit = AuditService(settings, self.registry.sessions, engine, self.redis)
        self.monitoring = MonitoringService(settings, self.registry.sessions, self.redis, self.registry)

    # snapshot ----------------------------------------------------------------------------
    def publish(self, preload: dict[str, list[int]] | None = None) -> int:
        """Read the state (with the next serial) and publish it; the serial Redis holds now."""
        return self.publish_data(self.registry.snapshot(preload))

    def publish_data(self, data: dict[str, Any]) -> int:
        """Publish a snapshot read by ``Registry.snapshot``; Redis keeps it only if no newer one
        is there already. Each version carries its monitoring spec (drift bins, ``MonitoringService.
        annotate``); the tokenizers of its text versions are in Redis before it is
        (``bastion.control.tokenizers``), and those no longer named go once it is. The serial
        Redis holds now."""
        data = self.monitoring.annotate(data)
        named = tokenizers.named(data)
        store = self.registry.store
        with redis_errors("the snapshot could not be published"):
            tokenizers.before_publish(self.redis, store, named)
            stored, written = snapshot.publish(self.redis, data)
            if written:
                tokenizers.after_publish(self.redis, store, stored, named)
        if not written:
            log.info("snapshot_superseded", serial=data.get("serial"), stored=stored)
        return stored

    def reconcile(self) -> bool:
        """Publish again when Redis holds no snapshot, or one older than the last serial SQL
        issued (Redis restarted without persistence, restored from an older copy, or away when a
        change was published), or when the serial key readers poll does not name the stored
        snapshot's serial (a Redis written by an older release): gateways and workers that start
        then never see a stale snapshot for longer than one reconcile period. True when it
        published."""
        with redis_errors("the snapshot could not be checked"):
            stored = snapshot.stored_serial(self.redis)
            polled = snapshot.polled_serial(self.redis)
        if stored is not None and stored >= self.registry.latest_serial() and polled == stored:
            return False
        log.warning("snapshot_republished", stored=stored)
        self.publish()
        return True

    # shadows, evaluations, warm-up -------------------------------------------------------
    def shadow_totals(self, model: str, versions: list[int]) -> dict[str, dict[str, float | int | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for version in versions:
            pipe.hgetall(shadow_key(model, version))
        with redis_errors("shadow figures are unavailable"):
            found = pipe.execute()
        out: dict[str, dict[str, float | int | None]] = {}
        for version, raw in zip(versions, found, strict=True):
            if not raw:
                continue
            t = {k.decode(): float(v) for k, v in raw.items()}
            rows, values = t.get("rows", 0.0), t.get("values", 0.0)
            out[str(version)] = {
                "requests": int(t.get("requests", 0)),
                "rows": int(rows),
                "agreement_rate": t.get("agree_rows", 0.0) / rows if rows else None,
                "mean_abs_diff": t.get("abs_diff_sum", 0.0) / values if values else None,
            }
        return out

    def reset_shadow(self, model: str) -> None:
        versions = self.registry.get_model(model)["versions"]
        keys = [shadow_key(model, v["version"]) for v in versions]
        if keys:
            with redis_errors("shadow figures are unavailable"):
                self.redis.delete(*keys)

    def start_evaluation(self, model: str, version: int, by: str) -> str:
        """Queue an evaluation job for a worker; the report is collected when the version is read.
        (In a unit of work, a failure to queue rolls the request of the evaluation back too.)"""
        job_id, spec = self.registry.lifecycle.begin_evaluation(model, version, by)
        try:
            # Workers find the version in the snapshot (only versions that take traffic or are
            # being evaluated are there): publish it before the job can be read.
            self.publish()
            with redis_errors("the evaluation could not be queued"):
                enqueue_evaluation(
                    self.redis,
                    job_id=job_id,
                    model=model,
                    version=version,
                    spec=spec,
                    max_queue=self.settings.max_queue_batch,
                    ttl_s=self.settings.result_ttl_s,
                )
        except (Unavailable, Overloaded):
            self.registry.lifecycle.finish_evaluation(model, version, job_id, "failed", b"", "could not be queued")
            raise
        log.info("evaluation_requested", model=model, version=version, job_id=job_id, by=by)
        return job_id

    def collect_evaluation(self, model: str, version: int) -> None:
        """If the version's evaluation job has finished, store its report with the version."""
        job_id = self.registry.lifecycle.running_evaluation(model, version)
        if job_id is None:
            return
        try:
            state: Any = self.redis.hmget(job_key(job_id), "status", "result", "error")
        except redis.RedisError:
            return  # still running as far as anyone can tell; read again later
        status, result, error = (v or b"" for v in state)
        if status.decode() in TERMINAL_STATUSES:
            self.registry.lifecycle.finish_evaluation(model, version, job_id, status.decode(), result, error.decode())

    def warm_up(self, model: str, versions: list[int]) -> bool:
        """Before ``versions`` take traffic, have the workers that serve ``model`` load and warm
        them up (phase one: a snapshot naming them as ``preload``; workers report in ``warm:``).
        Waits at most ``warm_timeout_s``; True when every new version is warm on some worker
        (or no worker serves the model yet, so there is nothing to wait for). Never call it inside
        a unit of work: it waits, and the unit would hold the database's write lock meanwhile."""
        dep = self.registry.deployments.get(model)
        routed = {r["version"] for r in dep["routes"]} | ({dep["fallback_version"]} - {None})
        new = sorted(set(versions) - routed)
        if not new or not any(self._warm_on_some_worker(model, v) for v in routed):
            return True
        self.publish(preload={model: new})
        deadline = time.monotonic() + self.settings.warm_timeout_s
        while not all(self._warm_on_some_worker(model, v) for v in new):
            if time.monotonic() > deadline:
                log.warning("warm_up_timed_out", model=model, versions=new, waited_s=self.settings.warm_timeout_s)
                return False
            time.sleep(0.02)
        return True

    def _warm_on_some_worker(self, model: str, version: int) -> bool:
        recent = time.time() - max(3 * self.settings.snapshot_refresh_s, 30.0)
        with redis_errors("warm-up reports are unavailable"):
            return bool(self.redis.zcount(warm_key(model, version), recent, "+inf"))

    def ready(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False


def plane_of(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane
