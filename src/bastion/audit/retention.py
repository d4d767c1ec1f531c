"""Payload retention: data keys past their tenant's ``retain_payloads_s`` are destroyed.

Data keys are per UTC day, so expiry is key destruction, as erasure is: the day ``d``'s key of a
tenant goes once the whole day is older than the retention (``(d + 1) days + retain <= now``),
so a payload is kept at least its retention and at most one day more. Reading enforces the
retention exactly in between (``AuditLog.payload`` answers ``expired`` for an event older than its
tenant's retention, whether or not its key is gone yet). A tenant whose retention is unset or 0
keeps nothing: all its keys go. The leaves stay: the chain still verifies.
"""

from __future__ import annotations

import time

from sqlalchemy import Engine, select

from bastion import logs, metrics
from bastion.audit import crypto
from bastion.audit.crypto import Keyring
from bastion.audit.tables import AuditDataKey
from bastion.registry.tables import Tenant

log = logs.get("bastion.audit.retention")

DAY_S = 86_400


def first_kept_day(retain_s: int | None, now_s: float) -> int | None:
    """Days before this one (UTC days since the epoch) are past ``retain_s``; None: keep none."""
    if not retain_s or retain_s <= 0:
        return None
    return int((now_s - retain_s) // DAY_S)


class Retention:
    def __init__(self, keyring: Keyring, engine: Engine) -> None:
        self.keyring = keyring
        self.engine = engine

    def sweep(self, now_s: float | None = None) -> int:
        """Destroy every data key past its tenant's retention; how many."""
        now = time.time() if now_s is None else now_s
        destroyed = 0
        sessions = self.keyring.sessions
        with sessions.begin() as s:
            retain: dict[str, int | None] = {n: r for n, r in s.execute(select(Tenant.name, Tenant.retain_payloads_s))}
            holders = list(s.scalars(select(AuditDataKey.tenant).distinct()))
            for tenant in holders:
                keep_from = first_kept_day(retain.get(tenant), now)
                if keep_from is None:
                    destroyed += self.keyring.destroy(s, tenant)
                else:
                    destroyed += self.keyring.destroy(s, tenant, before_day=keep_from)
        if destroyed:
            crypto.scrub(self.engine)
            metrics.AUDIT_KEYS_DESTROYED.labels("retention").inc(destroyed)
            log.info("audit_payloads_expired", keys_destroyed=destroyed)
        return destroyed
