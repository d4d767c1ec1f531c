"""Payload retention: data keys past their tenant's ``retain_payloads_s`` are destroyed.

Data keys are per UTC day, so expiry is key destruction, as erasure is: the day ``d``'s key of a
tenant goes once the whole day is older than the retention (``(d + 1) days + retain <= now``),
so a payload is kept at least its retention and at most one day more. Reading enforces the
retention exactly in between (``AuditLog.payload`` answers ``expired`` for an event older than its
tenant's retention, whether or not its key is gone yet). A tenant whose retention is unset or 0
keeps nothing: all its keys go. The leaves stay: the chain still verifies.

Live accuracy's data goes by age too: decision outcomes (``decision_outcomes``) and feedback
labels (``feedback``) of decisions made more than ``outcomes_window_s`` (``accuracy_window_s``)
ago are deleted on every sweep, for every tenant: the live figures never look further back.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, select

from bastion import logs, metrics
from bastion.audit import crypto
from bastion.audit.crypto import Keyring
from bastion.audit.tables import AuditDataKey, DecisionOutcome
from bastion.registry.tables import Feedback, Tenant
from bastion.settings import Settings

log = logs.get("bastion.audit.retention")

DAY_S = 86_400
OUTCOMES_WINDOW_S: int = Settings.model_fields["accuracy_window_s"].default


def first_kept_day(retain_s: int | None, now_s: float) -> int | None:
    """Days before this one (UTC days since the epoch) are past ``retain_s``; None: keep none."""
    if not retain_s or retain_s <= 0:
        return None
    return int((now_s - retain_s) // DAY_S)


class Retention:
    def __init__(self, keyring: Keyring, engine: Engine, outcomes_window_s: int = OUTCOMES_WINDOW_S) -> None:
        self.keyring = keyring
        self.engine = engine
        self.outcomes_window_s = outcomes_window_s

    def sweep(self, now_s: float | None = None) -> int:
        """Destroy every data key past its tenant's retention (how many), and delete the outcomes
        and labels of decisions older than ``outcomes_window_s``."""
        now = time.time() if now_s is None else now_s
        destroyed = 0
        sessions = self.keyring.sessions
        before = datetime.fromtimestamp(now - self.outcomes_window_s, UTC)
        with sessions.begin() as s:
            outcomes = s.execute(
                delete(DecisionOutcome).where(DecisionOutcome.at < before).execution_options(synchronize_session=False)
            )
            labels = s.execute(
                delete(Feedback).where(Feedback.predicted_at < before).execution_options(synchronize_session=False)
            )
            gone = {
                "outcomes": int(getattr(outcomes, "rowcount", 0) or 0),
                "labels": int(getattr(labels, "rowcount", 0) or 0),
            }
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
        if gone["outcomes"] or gone["labels"]:
            log.info("decision_outcomes_expired", outcomes=gone["outcomes"], labels=gone["labels"])
        return destroyed
