"""The decision log's wiring in the control plane: keys, signer, log, consumer, subjects, retention,
and the three loops beside the admin API (``consume``, ``checkpoints``, ``sweep``).

Keys come from the settings: the key-encryption key (``crypto.provider_from``) and the checkpoint
signing key (``resolved_audit_signing_key_file``: created in development, required in
production). Both refuse to start in production when missing, with an error naming the setting.
Each loop survives its dependencies going away (Redis, SQL): it logs, waits, and tries again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import redis
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import Engine

from bastion import logs
from bastion.audit import crypto
from bastion.audit.consumer import AuditConsumer
from bastion.audit.log import AuditLog
from bastion.audit.retention import Retention
from bastion.audit.signing import Signer
from bastion.audit.subjects import Subjects
from bastion.constants import AUDIT_CHECKPOINT_KEY
from bastion.registry.db import Sessions
from bastion.settings import Settings

log = logs.get("bastion.audit")

_RETRY_S = 1.0
_EXPIRE_EVERY_S = 60.0


def signer_from(settings: Settings) -> Signer:
    """The checkpoint signing key: loaded from its file; created there in development when missing;
    in production a missing file refuses to start."""
    path = settings.resolved_audit_signing_key_file
    if not path.exists():
        if settings.environment == "production":
            raise ValueError(
                "the decision log needs its checkpoint signing key in production: set BASTION_AUDIT_SIGNING_KEY_FILE "
                f"to an Ed25519 private key (PEM, PKCS#8); no file at {path}"
            )
        try:
            signer = Signer.create(path)
            log.warning("audit_signing_key_created", path=str(path), key_id=signer.key_id)
            return signer
        except FileExistsError:  # another process made it first
            pass
    return Signer.load(path)


def publisher(client: redis.Redis) -> Any:
    """Publish a checkpoint document at ``AUDIT_CHECKPOINT_KEY`` unless a larger one is there."""

    def publish(doc: dict[str, Any]) -> None:
        with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(AUDIT_CHECKPOINT_KEY)  # type: ignore[no-untyped-call]
                    current: Any = pipe.get(AUDIT_CHECKPOINT_KEY)
                    if current:
                        try:
                            if int(orjson.loads(current).get("size", 0)) >= doc["size"]:
                                pipe.unwatch()
                                return
                        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                            pass  # not ours: overwrite it
                    pipe.multi()
                    pipe.set(AUDIT_CHECKPOINT_KEY, orjson.dumps(doc))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    return publish


class AuditService:
    """``plane.audit``: the log (``log``), data-subject rights (``subjects``) and the loops."""

    def __init__(self, settings: Settings, sessions: Sessions, engine: Engine, client: redis.Redis) -> None:
        self.settings = settings
        self.keyring = crypto.Keyring(sessions, crypto.provider_from(settings))
        self.signer = signer_from(settings)
        self.log = AuditLog(
            sessions,
            self.keyring,
            self.signer,
            publish=publisher(client),
            # a checkpoint is signed at least every audit_checkpoint_events appended, one batch late at most
            max_unverified=settings.audit_checkpoint_events + settings.audit_batch,
            outcomes=settings.monitoring,  # live accuracy is part of monitoring
        )
        self.consumer = AuditConsumer(client, self.log, batch=settings.audit_batch)
        self.subjects = Subjects(self.log, self.consumer, client, engine)
        self.retention = Retention(self.keyring, engine, outcomes_window_s=settings.accuracy_window_s)
        self.redis = client
        self._since_checkpoint = 0

    def start(self) -> None:
        """Re-wrap keys under a rotated KEK, create the consumer group, publish the latest
        checkpoint (Redis may have lost it). Redis away: the loops try again."""
        self.keyring.rewrap()
        try:
            self.consumer.ensure_group()
            latest = self.log.latest_checkpoint()
            if latest is not None and self.log.publish is not None:
                self.log.publish(self.log.checkpoint_doc(latest))
        except redis.RedisError as exc:
            log.warning("audit_start_redis_unreachable", error_type=type(exc).__name__)

    def ensure_tenant_secret(self, tenant: str) -> None:
        """Create the tenant's pseudonym secret now unless it has one (joins a unit of work)."""
        self.keyring.tenant_secret(tenant, create=True)

    def pseudonym(self, tenant: str, subject: str) -> str | None:
        """A subject's pseudonym for searching; None: the log holds nothing of that tenant."""
        return self.subjects.pseudonym(tenant, subject)

    # loops -------------------------------------------------------------------------------
    def consume_once(self, block_ms: int = 1000) -> int:
        done = self.consumer.poll(block_ms)
        self._since_checkpoint += done.appended
        if self._since_checkpoint >= self.settings.audit_checkpoint_events:
            self._since_checkpoint = 0
            self.log.checkpoint()
        return done.appended

    async def consume(self) -> None:
        """Append the audit stream to the log until cancelled."""
        next_expiry = time.monotonic() + _EXPIRE_EVERY_S
        try:
            while True:
                try:
                    await run_in_threadpool(self.consume_once)
                    if time.monotonic() > next_expiry:
                        next_expiry = time.monotonic() + _EXPIRE_EVERY_S
                        expiry_ms = int(self.settings.consumer_expiry_s * 1000)
                        await run_in_threadpool(self.consumer.expire_consumers, expiry_ms)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis or SQL away: try again shortly
                    log.warning("audit_consume_failed", error_type=type(exc).__name__)
                    await asyncio.sleep(_RETRY_S)
        finally:
            self.consumer.close()  # a batch read ahead stays pending: claimed again after a restart

    async def checkpoints(self) -> None:
        """Sign a checkpoint every ``audit_checkpoint_s`` when the log grew."""
        while True:
            await asyncio.sleep(self.settings.audit_checkpoint_s)
            try:
                if await run_in_threadpool(self.log.checkpoint) is not None:
                    self._since_checkpoint = 0
            except Exception as exc:  # SQL away: the next period signs
                log.warning("audit_checkpoint_failed", error_type=type(exc).__name__)

    async def sweep(self) -> None:
        """Destroy data keys past their tenant's retention every ``audit_retention_sweep_s``."""
        while True:
            try:
                await run_in_threadpool(self.retention.sweep)
            except Exception as exc:  # SQL away: next period
                log.warning("audit_retention_failed", error_type=type(exc).__name__)
            await asyncio.sleep(self.settings.audit_retention_sweep_s)
