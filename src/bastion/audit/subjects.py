"""Data-subject rights: erase a subject's payloads (crypto-shredding), export every decision about it.

A subject is named by its tenant and its id (a trusted key's ``X-Bastion-Subject``; a caller
that names none is ``key:<its key id>``). SQL and the log only ever hold its pseudonym,
``HMAC-SHA256(tenant secret, blake2b(tenant NUL subject))``: the same subject string under two
tenants gives two unrelated pseudonyms, so nothing of one tenant's subject is found under the other.

``erase`` in order:

1. logs everything still waiting on the ``audit`` stream (its entries hold inputs and outputs);
2. in one transaction under the append lock: destroys the subject's data keys (every day's),
   deletes its decisions' outcomes (``decision_outcomes``: what each predicted) and the feedback
   labels sent for them (``feedback``), and records the erasure as an admin change
   (``subject.erase``, resource ``subject`` named by the pseudonym - never the subject) which is
   logged in the same transaction as an ``erasure`` leaf; then removes the deleted key bytes from
   the database files (``crypto.scrub``);
3. removes what Redis still holds for the subject: the job state (``job:{id}``) of each of its
   decisions, the idempotency records that name those jobs, response-cache entries answered to it
   (found by the decision's version and output digest, and exactly from the inputs where they
   were kept), the reply-stream entries of those jobs and its dead letters (by the subject digest
   the envelope carries);
4. rewrites the append-only file and the RDB snapshot (``BGREWRITEAOF``, ``BGSAVE``) and waits
   for both, so neither still holds the deleted values.

The log itself is untouched: every leaf stays, the chain still verifies; the payloads' state reads
``erased``. Erasing again is harmless (nothing left to destroy; one more ``erasure`` event).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
import redis
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.orm import Session

from bastion import logs, metrics
from bastion.audit import crypto
from bastion.audit.consumer import AuditConsumer
from bastion.audit.log import ERASE_ACTION, MAX_PAGE, AuditLog
from bastion.audit.tables import DecisionOutcome
from bastion.constants import (
    AUDIT_STREAM,
    DEAD_LETTER_PREFIX,
    IDEMPOTENCY_PREFIX,
    QUEUE_PREFIX,
    REPLY_PREFIX,
    job_key,
    response_cache_key,
)
from bastion.errors import InvalidInput, NotFound, Unavailable
from bastion.registry.tables import AdminChange, Feedback, SnapshotSerial, Tenant

log = logs.get("bastion.audit.subjects")

MAX_SUBJECT = 256
PERSIST_TIMEOUT_S = 300.0
_CHUNK = 500


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _cache_digest(blob: bytes) -> str:
    """The response cache's input digest (``gateway/response_cache.py``; the rule, copied)."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class Subjects:
    def __init__(self, audit: AuditLog, consumer: AuditConsumer, client: redis.Redis, engine: Engine) -> None:
        self.log = audit
        self.consumer = consumer
        self.redis = client
        self.engine = engine

    def pseudonym(self, tenant: str, subject: str) -> str | None:
        """The subject's pseudonym in the log; None when the tenant has no secret yet (then the
        log holds nothing about anyone of it)."""
        _check_subject(subject)
        return self.log.keyring.subject_pseudonym(tenant, subject)

    def _require_tenant(self, tenant: str) -> None:
        with self.log.sessions() as s:
            if s.scalar(select(Tenant.id).where(Tenant.name == tenant)) is None:
                raise NotFound(f"no tenant {tenant[:64]!r}")

    def _decisions(self, tenant: str, pseudonym: str) -> Iterator[dict[str, Any]]:
        after = None
        while True:
            items, after = self.log.search(
                tenant=tenant, pseudonym=pseudonym, kind="decision", after=after, limit=MAX_PAGE
            )
            yield from items
            if after is None:
                return

    # access ------------------------------------------------------------------------------
    def export(self, tenant: str, subject: str) -> list[dict[str, Any]]:
        """Every decision about ``subject`` of ``tenant``, oldest first, each with its leaf and its
        payload decrypted where it is still kept. Nothing about any other tenant's subjects."""
        _check_subject(subject)
        self._require_tenant(tenant)
        pseudonym = self.pseudonym(tenant, subject)
        if pseudonym is None:
            return []
        return [
            {
                "position": item["position"],
                "event": item["leaf"],
                "leaf_hash": item["leaf_hash"],
                "payload": self.log.payload(item["leaf"]["id"]),
            }
            for item in self._decisions(tenant, pseudonym)
        ]

    # erasure -----------------------------------------------------------------------------
    def erase(self, tenant: str, subject: str, by: str, request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Erase ``subject`` of ``tenant`` on behalf of principal ``by`` (never inside a unit of
        work: it commits its own change, then works on Redis). What was done."""
        _check_subject(subject)
        if self.log.sessions.in_unit:
            raise RuntimeError("erase commits its own change: never call it inside a unit of work")
        self._require_tenant(tenant)
        try:  # what is still on its way is logged first, so the erasure covers it
            drained = self.consumer.drain()
        except redis.RedisError as exc:
            raise Unavailable("the erasure needs Redis, which is unreachable; nothing was erased; retry") from exc
        pseudonym = self.log.keyring.subject_pseudonym(tenant, subject, create=True)
        if pseudonym is None:  # pragma: no cover - create=True always gives one
            raise RuntimeError("no pseudonym")
        decisions = list(self._decisions(tenant, pseudonym))
        ids = {d["leaf"]["id"] for d in decisions}
        cache_keys = set()
        for d in decisions:  # the exact cache entries, from inputs still kept (read before the keys go)
            state, found = self.log.opened(d["leaf"]["id"])
            if state == "kept" and found is not None and found[0] is not None:
                leaf = d["leaf"]
                cache_keys.add(response_cache_key(tenant, leaf["model"], leaf["version"], _cache_digest(found[0])))
        destroyed, forgotten, event_id = self._shred(tenant, pseudonym, by, ids, request or {})
        crypto.scrub(self.engine)
        metrics.AUDIT_KEYS_DESTROYED.labels("erasure").inc(destroyed)
        report: dict[str, Any] = {
            "tenant": tenant,
            "subject_pseudonym": pseudonym,
            "decisions": len(decisions),
            "keys_destroyed": destroyed,
            **forgotten,
            "event_id": event_id,
            "drained": drained,
        }
        try:
            report.update(self._clean_redis(tenant, subject, decisions, ids, cache_keys))
            report["streams_in_use"] = self._streams_in_use()
            report.update(persist(self.redis))
        except redis.RedisError as exc:
            raise Unavailable(
                f"the subject's keys were destroyed and the erasure recorded (event {event_id}), but Redis could not "
                "be cleaned; erase again once Redis is reachable"
            ) from exc
        log.info("subject_erased", tenant=tenant, subject_pseudonym=pseudonym, decisions=len(decisions), by=by)
        return report

    def _shred(
        self, tenant: str, pseudonym: str, by: str, ids: set[str], request: Mapping[str, Any]
    ) -> tuple[int, dict[str, int], str]:
        """Destroy the data keys, delete the outcomes and labels, and record the erasure, logged in
        the same transaction."""
        try:
            with self.log.sessions.begin() as s:
                self.log.lock(s)
                # the unit-of-work lock after the append lock, in the order appends take them
                s.execute(
                    update(SnapshotSerial)
                    .where(SnapshotSerial.id == 1)
                    .values(serial=SnapshotSerial.serial)
                    .execution_options(synchronize_session=False)
                )
                destroyed = self.log.keyring.destroy(s, tenant, pseudonym=pseudonym)
                forgotten = _forget_outcomes(s, tenant, pseudonym, ids)
                change = AdminChange(
                    principal_id=by[:64],
                    action=ERASE_ACTION,
                    resource_kind="subject",
                    resource_name=pseudonym,
                    detail={
                        **request,
                        "tenant": tenant,
                        "subject": pseudonym,
                        "keys_destroyed": destroyed,
                        "decisions": len(ids),
                        **forgotten,
                    },
                )
                s.add(change)
                s.flush()
                change_id = int(change.id)
                _, frontier = self.log.append_locked(s)
        except BaseException:
            self.log.appended(None)
            raise
        self.log.appended(frontier)
        return destroyed, forgotten, f"admin-{change_id}"

    def _clean_redis(
        self, tenant: str, subject: str, decisions: list[dict[str, Any]], ids: set[str], cache_keys: set[str]
    ) -> dict[str, int]:
        r = self.redis
        removed = 0
        listed = sorted(ids)
        for i in range(0, len(listed), _CHUNK):
            removed += int(r.delete(*[job_key(j) for j in listed[i : i + _CHUNK]]) or 0)
        removed += self._idempotency(tenant, ids)
        removed += self._cache(tenant, decisions, cache_keys)
        replies = self._stream_entries(f"{REPLY_PREFIX}*", lambda f: f.get(b"j", b"").decode(errors="replace") in ids)
        digest = crypto.subject_digest(tenant, subject)
        key_id = subject.removeprefix("key:") if subject.startswith("key:") else None

        def about(fields: dict[bytes, bytes]) -> bool:
            try:
                meta = orjson.loads(fields.get(b"m") or b"{}")
            except orjson.JSONDecodeError:
                return False
            if not isinstance(meta, dict) or meta.get("tenant") != tenant:
                return False
            return meta.get("subj") == digest or (
                key_id is not None and not meta.get("subj") and meta.get("key") == key_id
            )

        letters = self._stream_entries(f"{DEAD_LETTER_PREFIX}*", about)
        return {"redis_keys_removed": removed, "reply_entries_removed": replies, "dead_letters_removed": letters}

    def _streams_in_use(self) -> int:
        """Streams that carry inputs (the audit stream, job queues, dead letters) and still hold
        entries. Redis frees a deleted entry's bytes only with the last entry of its node (up to
        ``stream-node-max-entries``); until then a snapshot may still hold them. 0: none can.
        (``stream-node-max-entries 1`` makes every deletion free its bytes at once.)"""
        keys = [AUDIT_STREAM.encode()]
        for pattern in (f"{QUEUE_PREFIX}*", f"{DEAD_LETTER_PREFIX}*"):
            keys += list(self.redis.scan_iter(match=pattern, count=1000, _type="stream"))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.xlen(key)
        found = sum(1 for n in pipe.execute(raise_on_error=False) if isinstance(n, int) and n > 0)
        if found and _stream_node_entries(self.redis) != "1":
            log.warning("subject_erasure_streams_in_use", streams=found)
        return found

    def _idempotency(self, tenant: str, ids: set[str]) -> int:
        """Idempotency records of the tenant whose job is one of ``ids`` (they may hold its outcome)."""
        if not ids:
            return 0
        found = list(self.redis.scan_iter(match=f"{IDEMPOTENCY_PREFIX}{_glob(tenant)}:*", count=1000))
        removed = 0
        for i in range(0, len(found), _CHUNK):
            keys = found[i : i + _CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, "job")
            jobs = pipe.execute(raise_on_error=False)
            doomed = [
                k for k, j in zip(keys, jobs, strict=True) if isinstance(j, bytes) and j.decode(errors="replace") in ids
            ]
            if doomed:
                removed += int(self.redis.delete(*doomed) or 0)
        return removed

    def _cache(self, tenant: str, decisions: list[dict[str, Any]], exact: set[str]) -> int:
        """Response-cache entries answered to the subject: those computed from its kept inputs,
        and any entry of one of its versions whose value is one of its outputs (an entry of
        another caller with the same answer may go too: a cache miss, never a wrong answer)."""
        removed = int(self.redis.delete(*exact) or 0) if exact else 0
        outputs: dict[tuple[str, int], set[str]] = {}
        for d in decisions:
            leaf = d["leaf"]
            outputs.setdefault((leaf["model"], leaf["version"]), set()).add(leaf["output_sha256"])
        for (model, version), digests in outputs.items():
            pattern = response_cache_key(_glob(tenant), _glob(model), version, "*")
            found = list(self.redis.scan_iter(match=pattern, count=1000))
            for i in range(0, len(found), _CHUNK):
                keys = found[i : i + _CHUNK]
                values = self.redis.mget(keys)
                doomed = [
                    k
                    for k, v in zip(keys, values, strict=True)
                    if isinstance(v, bytes) and hashlib.sha256(v).hexdigest() in digests
                ]
                if doomed:
                    removed += int(self.redis.delete(*doomed) or 0)
        return removed

    def _stream_entries(self, pattern: str, doomed: Any) -> int:
        """Delete the entries of every stream matching ``pattern`` for which ``doomed(fields)``."""
        removed = 0
        for key in self.redis.scan_iter(match=pattern, count=1000, _type="stream"):
            last = "-"
            while True:
                entries: Any = self.redis.xrange(key, last, "+", count=1000)
                hits = [entry_id for entry_id, fields in entries if doomed(fields)]
                if hits:
                    removed += int(self.redis.xdel(key, *hits) or 0)
                if len(entries) < 1000:
                    break
                last = "(" + entries[-1][0].decode()
        return removed


def _forget_outcomes(s: Session, tenant: str, pseudonym: str, ids: set[str]) -> dict[str, int]:
    """Delete, in ``s``'s transaction, the outcomes of the subject's decisions (by the pseudonym
    they were written under: its own, or its key's for a caller that named none) and the labels
    of those decisions and of ``ids`` (its decisions in the log); how many of each."""
    mine = select(DecisionOutcome.event_id).where(
        DecisionOutcome.tenant == tenant, DecisionOutcome.subject == pseudonym
    )
    labels = _count(
        s.execute(
            delete(Feedback)
            .where(Feedback.tenant == tenant, Feedback.prediction_id.in_(mine))
            .execution_options(synchronize_session=False)
        )
    )
    listed = sorted(ids)
    for i in range(0, len(listed), _CHUNK):
        labels += _count(
            s.execute(
                delete(Feedback)
                .where(Feedback.tenant == tenant, Feedback.prediction_id.in_(listed[i : i + _CHUNK]))
                .execution_options(synchronize_session=False)
            )
        )
    outcomes = _count(
        s.execute(
            delete(DecisionOutcome)
            .where(DecisionOutcome.tenant == tenant, DecisionOutcome.subject == pseudonym)
            .execution_options(synchronize_session=False)
        )
    )
    for i in range(0, len(listed), _CHUNK):
        outcomes += _count(
            s.execute(
                delete(DecisionOutcome)
                .where(DecisionOutcome.tenant == tenant, DecisionOutcome.event_id.in_(listed[i : i + _CHUNK]))
                .execution_options(synchronize_session=False)
            )
        )
    return {"outcomes_deleted": outcomes, "labels_deleted": labels}


def _count(result: Any) -> int:
    return max(0, int(getattr(result, "rowcount", 0) or 0))


def _stream_node_entries(client: redis.Redis) -> str:
    try:
        found: Any = client.config_get("stream-node-max-entries")
    except redis.ResponseError:  # a managed Redis may refuse CONFIG
        return ""
    return str(found.get("stream-node-max-entries", ""))


def _check_subject(subject: str) -> None:
    if not isinstance(subject, str) or not 0 < len(subject) <= MAX_SUBJECT:
        raise InvalidInput(f"a subject is 1 to {MAX_SUBJECT} characters")


# persistence -----------------------------------------------------------------------------
def persist(client: redis.Redis, timeout_s: float = PERSIST_TIMEOUT_S) -> dict[str, bool]:
    """Rewrite the AOF (when Redis keeps one) and save a new RDB snapshot, started after now, and
    wait for both: afterwards neither file holds a value deleted before the call. A Redis that
    refuses the commands (a managed one may) is reported, not raised."""
    deadline = time.monotonic() + timeout_s
    info: Any = client.info("persistence")
    done = {"aof_rewritten": False, "rdb_saved": False}
    if int(info.get("aof_enabled", 0)) == 1:
        rewrites = info.get("aof_rewrites")
        if _start(client, "BGREWRITEAOF", deadline):
            done["aof_rewritten"] = _wait(client, deadline, rewrites, "aof_rewrites", "aof_last_bgrewrite_status")
    saves = client.info("persistence").get("rdb_saves")
    if _start(client, "BGSAVE", deadline):
        done["rdb_saved"] = _wait(client, deadline, saves, "rdb_saves", "rdb_last_bgsave_status")
    if not all(done.values()):
        log.warning("subject_erasure_persistence_incomplete", **done)
    return done


def _busy(info: Any) -> bool:
    return bool(
        int(info.get("aof_rewrite_in_progress", 0))
        or int(info.get("aof_rewrite_scheduled", 0))
        or int(info.get("rdb_bgsave_in_progress", 0))
    )


def _start(client: redis.Redis, command: str, deadline: float) -> bool:
    """Start ``command`` once whatever runs now has finished (a run that started before the
    deletions may hold them)."""
    while time.monotonic() < deadline:
        info: Any = client.info("persistence")
        if _busy(info):
            time.sleep(0.05)
            continue
        try:
            if command == "BGREWRITEAOF":
                client.bgrewriteaof()
            else:
                client.bgsave()
            return True
        except redis.ResponseError as exc:
            text = str(exc).lower()
            if "in progress" in text or "already" in text:
                time.sleep(0.05)
                continue
            log.warning("redis_persistence_refused", command=command, error=str(exc)[:120])
            return False
    return False


def _wait(client: redis.Redis, deadline: float, before: Any, counter: str, status: str) -> bool:
    while time.monotonic() < deadline:
        info: Any = client.info("persistence")
        finished = not _busy(info)
        counted = before is None or int(info.get(counter, 0)) > int(before)
        if finished and counted:
            return str(info.get(status, "ok")) == "ok"
        time.sleep(0.05)
    return False
