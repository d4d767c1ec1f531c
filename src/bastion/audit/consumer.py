"""The control plane's reader of the ``audit`` stream: at-least-once delivery, logged once by id.

Entries (contract 1: ``e`` the producer's event, ``o`` the outputs, ``i`` the inputs when kept)
are read through the consumer group ``audit-log`` (created here, ``MKSTREAM``, from the start of
the stream) under a name unique to this process, ``batch`` at a time. Each batch is appended to
the log in one transaction and only then acknowledged and deleted (``XACK`` + ``XDEL`` in one
``MULTI``), so the stream's length is the backlog the gateways watch. A crash between the commit
and the acknowledgement leaves the entries pending: they are claimed again (``XAUTOCLAIM``, idle
over ``claim_idle_ms``, from any consumer, dead or alive) and the log skips the ids it holds, so
nothing is logged twice and nothing is skipped, with any number of control-plane replicas. A batch
whose append failed (SQL away) is kept and tried again on the next poll.

While one full batch is appended (SQL inserts and the commit's fsync, which release the GIL),
``poll`` reads the next one and builds its leaves on a second thread; it is appended by the next
poll, or kept for a retry with the current one when that fails. A process that stops meanwhile
leaves it pending under its name: claimed again, like any crash's.

With tracing on, each appended batch has a span, ``audit append`` (CONSUMER): a child of its
first event's context (the event's ``tp``, the worker's job span) and linked to the others', so
a request's trace reaches the control plane with a parent link when its event leads a batch and
with a link otherwise.
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson
import redis

from bastion import ids, logs, metrics, tracing
from bastion.audit.leaves import Decision, Leaf
from bastion.audit.log import Appended, AuditLog
from bastion.constants import AUDIT_GROUP, AUDIT_STREAM

log = logs.get("bastion.audit.consumer")

CLAIM_IDLE_MS = 30_000
_CLAIM_EVERY_S = 5.0
_LAG_EVERY_S = 0.5

Entry = tuple[bytes, dict[bytes, bytes]]
Batch = tuple[list[Entry], list[Leaf] | None]  # entries read, and their leaves (None: not prepared yet)


def consumer_name() -> str:
    """A name no other process uses: host, pid and random bytes."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{ids.hex_id(4)}"


def decision_of(entry_id: str, fields: dict[bytes, bytes]) -> Decision:
    """An entry as the log takes it; a malformed event becomes an empty one (logged under a
    safe id, never dropped)."""
    try:
        event: Any = orjson.loads(fields.get(b"e") or b"{}")
    except orjson.JSONDecodeError:
        event = {}
    return Decision(
        event=event if isinstance(event, dict) else {},
        outputs=fields.get(b"o", b""),
        inputs=fields.get(b"i"),
        entry_id=entry_id,
    )


def _append_span(entries: list[Entry]) -> tracing.Span:
    """The span of appending ``entries``: a child of the first event's trace context, linked to
    the next ones' (at most ``tracing.MAX_LINKS``)."""
    contexts: list[tracing.Parent] = []
    for _, fields in entries[: tracing.MAX_LINKS + 1]:
        # The producers' JSON has no spaces: "tp":"<55 characters>" when the event has a valid
        # one, which parse checks (anything else - escaped, cut, absent - is no context).
        event = fields.get(b"e") or b""
        at = event.find(b'"tp":"')
        found = tracing.parse(event[at + 6 : at + 61].decode(errors="replace")) if at >= 0 else None
        if found is not None:
            contexts.append(found)
    parent = contexts[0] if contexts else None
    return tracing.start(
        "audit append",
        parent,
        kind=tracing.CONSUMER,
        attributes={"bastion.audit.events": len(entries)},
        links=contexts[1:],
        remote=parent is not None,
    )


def entry_ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        return int(text.partition("-")[0])
    except ValueError:
        return 0


class AuditConsumer:
    def __init__(
        self,
        client: redis.Redis,
        audit: AuditLog,
        *,
        batch: int,
        name: str | None = None,
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ) -> None:
        self.redis = client
        self.log = audit
        self.batch = batch
        self.name = name or consumer_name()
        self.claim_idle_ms = claim_idle_ms
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._next_lag = 0.0
        self._retry: list[Entry] = []
        self._ahead: Future[Batch] | None = None  # the next batch, being read and prepared
        self._reader: ThreadPoolExecutor | None = None

    def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            self.redis.xgroup_create(AUDIT_STREAM, AUDIT_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int = 1000) -> Appended:
        """One round: retry a failed batch, or claim entries of dead consumers, or take the batch
        read ahead, or read new ones (waiting up to ``block_ms``); append them and
        acknowledge. After a full batch the next one is read (without waiting) and prepared
        while this one is appended. With nothing to read it still logs admin changes not logged
        yet."""
        entries = self._retry or self._claim()
        self._retry = []
        batch = (entries, None) if entries else self._take_ahead() or (self._read(block_ms), None)
        entries, prepared = batch
        if len(entries) >= self.batch:
            self._read_ahead()
        try:
            done = self.handle(entries, prepared)
        except Exception:
            ahead = self._take_ahead()
            self._retry = entries + (ahead[0] if ahead else [])  # pending under our name: tried again next round
            raise
        finally:
            self.measure()
        return done

    def handle(self, entries: list[Entry], prepared: list[Leaf] | None = None) -> Appended:
        """Append ``entries`` (ids already logged are skipped; ``prepared``: their leaves, from
        ``AuditLog.prepare``), then acknowledge and delete them."""
        if prepared is None:
            prepared = self._prepare(entries)
        if not (tracing.ON and entries):
            done = self.log.append_prepared(prepared, len(entries))
            if entries:
                self._ack([e for e, _ in entries])
            return done
        span = _append_span(entries)
        try:
            done = self.log.append_prepared(prepared, len(entries))
            self._ack([e for e, _ in entries])
        except Exception as exc:
            span.fail(f"append failed ({type(exc).__name__}); kept for a retry")
            raise
        else:
            span.attributes["bastion.audit.appended"] = done.appended
            span.attributes["bastion.audit.skipped"] = done.skipped
        finally:
            span.end()
        return done

    def _prepare(self, entries: list[Entry]) -> list[Leaf]:
        return self.log.prepare([decision_of(entry_id.decode(), fields) for entry_id, fields in entries])

    def _read_ahead(self) -> None:
        if self._ahead is not None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-read-ahead")

        def read() -> Batch:
            entries = self._read(None)
            try:
                return entries, self._prepare(entries)
            except Exception:  # read and pending under our name: the poll prepares them again
                return entries, None

        self._ahead = self._reader.submit(read)

    def _take_ahead(self) -> Batch | None:
        """The batch read ahead, once read; None when none was (or its read failed: what it read
        stays pending under our name and is claimed again)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        try:
            batch = ahead.result()
        except Exception as exc:
            log.warning("audit_read_ahead_failed", error_type=type(exc).__name__)
            return None
        return batch if batch[0] else None

    def close(self) -> None:
        """Wait for a read ahead and stop its thread (what it read stays pending, claimed again)."""
        self._take_ahead()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    def drain(self) -> int:
        """Log everything in the stream now: claim every pending entry (of any consumer, however
        briefly idle - appending is idempotent) and read until nothing is left. Entries written
        meanwhile are read too. How many entries were handled."""
        handled = 0
        cursor = "0-0"
        while True:  # every pending entry, whoever holds it
            cursor, claimed = self._autoclaim(cursor, 0)
            if claimed:
                self.handle(claimed)
                handled += len(claimed)
            if cursor == "0-0":
                break
        while True:
            entries = self._read(None)
            if not entries:
                break
            self.handle(entries)
            handled += len(entries)
        return handled

    def _claim(self) -> list[Entry]:
        now = time.monotonic()
        if self._cursor == "0-0" and now < self._next_claim:
            return []
        self._cursor, entries = self._autoclaim(self._cursor, self.claim_idle_ms)
        if self._cursor == "0-0":
            self._next_claim = now + _CLAIM_EVERY_S
        if entries:
            log.info("audit_entries_claimed", count=len(entries), consumer=self.name)
        return entries

    def _autoclaim(self, cursor: str, min_idle_ms: int) -> tuple[str, list[Entry]]:
        try:
            found: Any = self.redis.xautoclaim(
                AUDIT_STREAM, AUDIT_GROUP, self.name, min_idle_ms, start_id=cursor, count=self.batch
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.ensure_group()
                return "0-0", []
            raise
        nxt = found[0].decode() if isinstance(found[0], bytes) else str(found[0])
        entries = [(entry_id, fields) for entry_id, fields in found[1] if fields]
        gone = [entry_id for entry_id, fields in found[1] if not fields]  # Redis 6.2: deleted meanwhile
        if len(found) > 2:
            gone += list(found[2])  # Redis 7: ids pending but no longer in the stream
        if gone:
            self.redis.xack(AUDIT_STREAM, AUDIT_GROUP, *gone)
        return nxt, entries

    def _read(self, block_ms: int | None) -> list[Entry]:
        try:
            found: Any = self.redis.xreadgroup(
                AUDIT_GROUP, self.name, {AUDIT_STREAM: ">"}, count=self.batch, block=block_ms
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.ensure_group()
                return []
            raise
        if not found:
            return []
        _, entries = found[0]
        return [(entry_id, fields) for entry_id, fields in entries]

    def _ack(self, entry_ids: list[bytes]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(AUDIT_STREAM, AUDIT_GROUP, *entry_ids)
        pipe.xdel(AUDIT_STREAM, *entry_ids)
        pipe.execute()

    def lag_s(self) -> float:
        """Age of the oldest entry not yet logged (the stream holds only those), seconds."""
        oldest: Any = self.redis.xrange(AUDIT_STREAM, "-", "+", count=1)
        if not oldest:
            return 0.0
        seconds, micros = self.redis.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return max(0.0, (now_ms - entry_ms(oldest[0][0])) / 1000)

    def measure(self, force: bool = False) -> None:
        """Export the lag and backlog, at most every half second (unless ``force``)."""
        now = time.monotonic()
        if now < self._next_lag and not force:
            return
        self._next_lag = now + _LAG_EVERY_S
        try:
            metrics.AUDIT_LAG.set(self.lag_s())
            metrics.AUDIT_BACKLOG.set(int(self.redis.xlen(AUDIT_STREAM)))
        except redis.RedisError:
            pass  # Redis away: the poll says so

    def expire_consumers(self, idle_ms: int) -> int:
        """Remove consumers of the group (not this one) idle for ``idle_ms`` with nothing pending."""
        removed = 0
        try:
            found: Any = self.redis.xinfo_consumers(AUDIT_STREAM, AUDIT_GROUP)
        except redis.ResponseError:
            return 0
        for consumer in found:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else str(consumer["name"])
            if name != self.name and int(consumer.get("pending", 0)) == 0 and int(consumer.get("idle", 0)) > idle_ms:
                self.redis.xgroup_delconsumer(AUDIT_STREAM, AUDIT_GROUP, name)
                removed += 1
        return removed
