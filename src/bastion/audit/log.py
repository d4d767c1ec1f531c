"""The decision log in SQL: an append-only Merkle log (RFC 9162 §2.1) of decisions and admin changes.

Guarantees:

- **Once per id.** ``append`` skips an event whose id is already logged (and repeats inside a
  batch), so a redelivered stream entry is never logged twice. One transaction per batch.
- **One appender at a time, on every database.** Each append first updates the ``audit_head``
  row (a row lock on PostgreSQL, the write lock on SQLite) and only then reads the size, so two
  control-plane replicas never assign the same position; positions are 0-based and contiguous.
- **No admin change without its event.** Every append also logs the admin changes
  (``admin_changes``) recorded since the last one logged (``audit_head.admin_through``). It reads
  them under the snapshot serial's row lock, which each unit of work holds from its start to its
  commit: so no change with a lower id can still commit after a higher one was logged.
- **Pseudonyms, never subjects.** A leaf names its subject by ``HMAC-SHA256(tenant secret,
  subject digest)``; inputs and outputs are never stored in clear: with the tenant's retention
  they are sealed (AES-256-GCM, the event id as associated data) under the data key of the
  subject (or, with none named, of the caller's key) and the event's UTC day, else dropped.
- **Nothing updates or deletes a leaf.** Every perfect subtree of level >= 1 is stored
  (``audit_nodes``), so each proof reads O(log n) rows by primary key.
- **An outcome with each decision.** In the same transaction as its leaf, a decision gets its
  ``decision_outcomes`` row: what it predicted (label, score, value, rows; ``audit/outcomes.py``),
  read from the outputs in clear on the stream by the version's conventions, for live accuracy.
  It is no part of the tree (erasure and retention delete it).

Checkpoints (``checkpoint``) sign (size, root, time) with the Ed25519 key of ``audit/signing.py``;
``verify`` recomputes the tree against them with ``audit/verify.py``, the verifier an offline
export uses too.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session

from bastion import codec, logs, metrics
from bastion.audit import merkle
from bastion.audit import verify as verifier
from bastion.audit.crypto import Keyring, Undecryptable, key_subject, open_sealed, seal, subject_digest
from bastion.audit.leaves import (  # re-exported: subjects.py names erasures by it
    ERASE_ACTION as ERASE_ACTION,
)
from bastion.audit.leaves import (
    EVENT_ID,
    Decision,
    Leaf,
    admin_leaf,
    as_int,
    decision_leaf,
    search_columns,
    text,
    unpack_payload,
)
from bastion.audit.leaves import column as search_column
from bastion.audit.outcomes import Reading, outcome_of, reading
from bastion.audit.signing import Checkpoint, Signer, checkpoint_message
from bastion.audit.tables import (
    HEAD_ID,
    AuditCheckpoint,
    AuditHead,
    AuditLeaf,
    AuditNode,
    AuditPayload,
    AuditSigningKey,
    DecisionOutcome,
)
from bastion.errors import Conflict, InvalidInput, NotFound, Unavailable
from bastion.registry.db import Sessions
from bastion.registry.tables import AdminChange, Base, Model, ModelVersion, SnapshotSerial, Tenant
from bastion.timefmt import iso_utc

log = logs.get("bastion.audit")

MAX_PAGE = 1000
_READINGS_KEPT = 10_000  # versions' output readings remembered (versions are immutable)
KINDS = ("decision", "admin", "erasure")


@dataclass(frozen=True, slots=True)
class Appended:
    appended: int  # leaves added (decisions and admin changes)
    skipped: int  # decisions already logged (or repeated in the batch)
    size: int | None  # the tree's size after the append (None: nothing to do, nothing read)


def _tensors(blob: bytes) -> dict[str, Any]:
    return {name: array.tolist() for name, array in codec.decode(blob).items()}


class AuditLog:
    """The decision log (contract 6). ``publish`` is called with each new checkpoint's document."""

    def __init__(
        self,
        sessions: Sessions,
        keyring: Keyring,
        signer: Signer,
        *,
        publish: Callable[[dict[str, Any]], None] | None = None,
        max_unverified: int | None = None,
        outcomes: bool = True,
    ) -> None:
        """``max_unverified``: the most leaves a live log may hold past its last checkpoint (the
        checkpoint cadence allows no more); a verification to the end finds more a tampering
        (checkpoints deleted). None: not bounded. ``outcomes``: write each decision's
        ``decision_outcomes`` row (what live accuracy grades labels against; off with monitoring)."""
        self.sessions = sessions
        self.outcomes = outcomes
        self.max_unverified = max_unverified
        self.keyring = keyring
        self.signer = signer
        self.publish = publish
        self._frontier: merkle.Frontier | None = None  # the tree after this process's last append
        self._key_known = False
        self._readings: dict[tuple[str, int], Reading] = {}  # how each version's outputs are read

    # appending ---------------------------------------------------------------------------
    def append(self, decisions: Sequence[Decision] = ()) -> Appended:
        """Log ``decisions`` (ids already logged are skipped) and the admin changes not logged
        yet, in one transaction; never inside a unit of work."""
        if self.sessions.in_unit:
            raise RuntimeError("the decision log appends in its own transactions, never inside a unit of work")
        return self.append_prepared(self.prepare(decisions), len(decisions))

    def prepare(self, decisions: Sequence[Decision]) -> list[Leaf]:
        """The leaves of ``decisions``, each id once (the first of repeats); reads nothing under
        the append lock, so a caller may build the next batch's while one is appended."""
        prepared, seen = [], set()
        for decision in decisions:
            leaf = decision_leaf(decision, self.keyring.pseudonym)
            if leaf.event_id not in seen:
                seen.add(leaf.event_id)
                leaf.outcome = self._outcome(decision, leaf) if self.outcomes else None
                prepared.append(leaf)
        return prepared

    def _outcome(self, decision: Decision, leaf: Leaf) -> dict[str, Any]:
        """The ``decision_outcomes`` row of a decision's leaf: what it predicted, and whose it is
        (the subject's pseudonym; with none named, the caller's key's, as its data key is)."""
        event = decision.event
        tenant = leaf.tenant or ""
        holder = leaf.owner[1] if leaf.owner is not None else leaf.subject
        if holder is None and tenant:
            key = event.get("key")
            holder = self.keyring.pseudonym(
                tenant, subject_digest(tenant, key_subject(key if type(key) is str else ""))
            )
        model, version = leaf.model or "", leaf.version or 0
        found = outcome_of(decision.outputs, self._reading(model, version), as_int(event.get("rows")))
        role = event.get("role")
        return {
            "event_id": leaf.event_id,
            "tenant": search_column(tenant, 128),
            "subject": search_column(holder, 64),
            "model": search_column(model, 128),
            "version": version,
            "role": search_column(role if type(role) is str else "", 16),
            "at": leaf.at,
            "rows": found.rows,
            "label": found.label,
            "score": found.score,
            "classes": found.classes,
            "value": found.value,
        }

    def _reading(self, model: str, version: int) -> Reading:
        """How the version's outputs are read, from its signature and post-processing (one query
        per version and process; a version unknown here reads by the outputs' element types)."""
        key = (model, version)
        found = self._readings.get(key)
        if found is None:
            with self.sessions() as s:
                row = s.execute(
                    select(ModelVersion.signature, ModelVersion.meta)
                    .join(Model, Model.id == ModelVersion.model_id)
                    .where(Model.name == model, ModelVersion.version == version)
                ).first()
            found = reading(row.signature, row.meta) if row is not None else Reading()
            if len(self._readings) >= _READINGS_KEPT:
                self._readings.clear()
            self._readings[key] = found
        return found

    def append_prepared(self, prepared: Sequence[Leaf], received: int) -> Appended:
        """``append`` of leaves from ``prepare`` (of ``received`` decisions)."""
        if self.sessions.in_unit:
            raise RuntimeError("the decision log appends in its own transactions, never inside a unit of work")
        if not prepared and not self._admin_pending():
            return Appended(0, 0, None)
        try:
            with self.sessions.begin() as s:
                added, size, frontier = self._append_locked(s, prepared)
        except BaseException:
            self._frontier = None  # whatever it holds was not committed
            raise
        self._frontier = frontier
        for kind, count in _counts(added).items():
            metrics.AUDIT_EVENTS.labels(kind).inc(count)
        decided = sum(1 for leaf in added if leaf.kind == "decision")
        return Appended(len(added), received - decided, size)

    def append_locked(self, s: Session, prepared: Sequence[Leaf] = ()) -> tuple[int, merkle.Frontier]:
        """Inside a caller's transaction that already holds the append lock (``lock``): log the
        pending admin changes. The caller commits, then calls ``appended(frontier)``."""
        added, size, frontier = self._append_locked(s, prepared, locked=True)
        for kind, count in _counts(added).items():
            metrics.AUDIT_EVENTS.labels(kind).inc(count)
        return size, frontier

    def appended(self, frontier: merkle.Frontier | None) -> None:
        self._frontier = frontier

    def lock(self, s: Session) -> AuditHead:
        """Take the append lock (update the head row first) and read the head under it."""
        s.execute(
            update(AuditHead)
            .where(AuditHead.id == HEAD_ID)
            .values(size=AuditHead.size)
            .execution_options(synchronize_session=False)
        )
        head = s.get(AuditHead, HEAD_ID, populate_existing=True)
        if head is None:
            raise Unavailable("the decision log's head row is missing: the database was not migrated")
        return head

    def _append_locked(
        self, s: Session, prepared: Sequence[Leaf], locked: bool = False
    ) -> tuple[list[Leaf], int, merkle.Frontier]:
        head = s.get(AuditHead, HEAD_ID) if locked else self.lock(s)
        if head is None:
            raise Unavailable("the decision log's head row is missing: the database was not migrated")
        size, through = int(head.size), int(head.admin_through)
        ids = [leaf.event_id for leaf in prepared]
        logged: set[str] = set()
        for i in range(0, len(ids), 500):
            logged.update(s.scalars(select(AuditLeaf.event_id).where(AuditLeaf.event_id.in_(ids[i : i + 500]))))
        leaves = [admin_leaf(row) for row in self._admin_rows(s, through)]
        if leaves:
            through = int(leaves[-1].event_id.removeprefix("admin-"))
        leaves += [leaf for leaf in prepared if leaf.event_id not in logged]
        frontier = self._frontier_at(s, size)
        if not leaves:
            return [], size, frontier
        keys = self.keyring.data_keys(s, {leaf.owner for leaf in leaves if leaf.owner is not None})
        rows, nodes, payloads, outcomes = [], [], [], []
        for position, leaf in enumerate(leaves, start=size):
            hashed = merkle.leaf_hash(leaf.body)
            nodes += [{"level": lv, "idx": ix, "hash": h} for lv, ix, h in frontier.append(hashed) if lv >= 1]
            rows.append(
                {
                    "position": position,
                    "event_id": leaf.event_id,
                    "kind": leaf.kind,
                    "at": leaf.at,
                    "tenant": search_column(leaf.tenant, 128),
                    "subject": search_column(leaf.subject, 64),
                    "model": search_column(leaf.model, 128),
                    "version": leaf.version,
                    "body": leaf.body,
                    "leaf_hash": hashed,
                }
            )
            if leaf.sealed is not None and leaf.owner is not None:
                key_id, key = keys[leaf.owner]
                nonce, ciphertext = seal(key, leaf.sealed, leaf.event_id.encode())
                payloads.append(
                    {"event_id": leaf.event_id, "data_key_id": key_id, "nonce": nonce, "ciphertext": ciphertext}
                )
            if leaf.outcome is not None:
                outcomes.append(leaf.outcome)
        _insert(s, AuditLeaf, rows)
        _insert(s, AuditNode, nodes)
        _insert(s, AuditPayload, payloads)
        _insert(s, DecisionOutcome, outcomes)
        s.execute(
            update(AuditHead)
            .where(AuditHead.id == HEAD_ID)
            .values(size=size + len(leaves), admin_through=through)
            .execution_options(synchronize_session=False)
        )
        return leaves, size + len(leaves), frontier

    def _admin_pending(self) -> bool:
        with self.sessions() as s:
            through = s.scalar(select(AuditHead.admin_through).where(AuditHead.id == HEAD_ID)) or 0
            newest = s.scalar(select(func.max(AdminChange.id))) or 0
        return int(newest) > int(through)

    def _admin_rows(self, s: Session, through: int) -> list[AdminChange]:
        newest = s.scalar(select(func.max(AdminChange.id))) or 0
        if int(newest) <= through:
            return []
        # Units of work hold this row's lock from their start to their commit: once we hold it,
        # every change with an id up to the newest is committed or rolled back, never pending.
        s.execute(
            update(SnapshotSerial)
            .where(SnapshotSerial.id == 1)
            .values(serial=SnapshotSerial.serial)
            .execution_options(synchronize_session=False)
        )
        return list(s.scalars(select(AdminChange).where(AdminChange.id > through).order_by(AdminChange.id)))

    # the tree ------------------------------------------------------------------------------
    def _perfect(self, s: Session) -> Callable[[int, int], bytes]:
        def perfect(level: int, index: int) -> bytes:
            if level == 0:
                found = s.scalar(select(AuditLeaf.leaf_hash).where(AuditLeaf.position == index))
            else:
                found = s.scalar(select(AuditNode.hash).where(AuditNode.level == level, AuditNode.idx == index))
            if found is None:
                raise Unavailable(
                    f"the decision log's storage lacks the subtree ({level}, {index}); run `bastion audit verify`"
                )
            return bytes(found)

        return perfect

    def _frontier_at(self, s: Session, size: int) -> merkle.Frontier:
        """The tree of ``size`` leaves, to append to: a copy of this process's last one when it
        is that size (no one appended since), else rebuilt from storage."""
        cached = self._frontier
        if cached is not None and cached.size == size:
            return merkle.Frontier(size=cached.size, nodes=list(cached.nodes))
        return merkle.Frontier.from_perfect(size, self._perfect(s))

    def size(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(AuditHead.size).where(AuditHead.id == HEAD_ID)) or 0)

    def root(self, size: int) -> bytes:
        """The tree's root hash at ``size`` leaves (any size up to the current one)."""
        self._check_size(size)
        with self.sessions() as s:
            return merkle.Frontier.from_perfect(size, self._perfect(s)).root()

    def frontier_at(self, start: int) -> list[bytes]:
        """The perfect-subtree hashes left of ``start`` (what ``verify`` needs to start there)."""
        self._check_size(start)
        with self.sessions() as s:
            return list(merkle.Frontier.from_perfect(start, self._perfect(s)).nodes)

    def _check_size(self, size: int) -> int:
        current = self.size()
        if not 0 <= size <= current:
            raise InvalidInput(f"the log holds {current} events; {size} is not a size it had")
        return current

    # checkpoints -------------------------------------------------------------------------
    def checkpoint(self, now_ms: int | None = None) -> Checkpoint | None:
        """Sign a checkpoint of the tree as it is now, when it grew since the last one; None when
        it did not (or another replica signed this size first)."""
        with self.sessions() as s:
            size = int(s.scalar(select(AuditHead.size).where(AuditHead.id == HEAD_ID)) or 0)
            last = int(s.scalar(select(func.max(AuditCheckpoint.size))) or 0)
            if size <= last:
                return None
            root = merkle.Frontier.from_perfect(size, self._perfect(s)).root()
        at_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        signature = self.signer.sign(checkpoint_message(size, root, at_ms))
        made = Checkpoint(size=size, root=root, at_ms=at_ms, key_id=self.signer.key_id, signature=signature)
        try:
            with self.sessions.begin() as s:
                self._register_key(s)
                s.add(AuditCheckpoint(size=size, root=root, at_ms=at_ms, key_id=made.key_id, signature=signature))
        except SqlIntegrityError:
            return None  # another replica signed this size
        metrics.AUDIT_CHECKPOINTS.inc()
        if self.publish is not None:
            try:
                self.publish(self.checkpoint_doc(made))
            except Exception as exc:  # signed and stored: the next one is published
                log.warning("audit_checkpoint_publish_failed", error_type=type(exc).__name__)
        return made

    def since_checkpoint(self) -> int:
        """Leaves appended after the latest checkpoint."""
        with self.sessions() as s:
            size = int(s.scalar(select(AuditHead.size).where(AuditHead.id == HEAD_ID)) or 0)
            last = int(s.scalar(select(func.max(AuditCheckpoint.size))) or 0)
        return size - last

    def _register_key(self, s: Session) -> None:
        if self._key_known:
            return
        if s.get(AuditSigningKey, self.signer.key_id) is None:
            with s.begin_nested():
                s.add(AuditSigningKey(key_id=self.signer.key_id, public_key=self.signer.public_raw))
        self._key_known = True

    def checkpoint_doc(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """A checkpoint as published and served: its fields (hex) and the signing public key."""
        if checkpoint.key_id == self.signer.key_id:
            public: bytes | None = self.signer.public_raw
        else:
            public = self.public_keys().get(checkpoint.key_id)
        return {**checkpoint.to_dict(), "public_key": public.hex() if public else None}

    def checkpoints(self, after: int = 0, limit: int = MAX_PAGE) -> list[Checkpoint]:
        """Checkpoints of size above ``after``, smallest first."""
        limit = _page(limit)
        with self.sessions() as s:
            rows = s.scalars(
                select(AuditCheckpoint).where(AuditCheckpoint.size > after).order_by(AuditCheckpoint.size).limit(limit)
            )
            return [_checkpoint(r) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        with self.sessions() as s:
            row = s.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.size.desc()).limit(1))
            return _checkpoint(row) if row is not None else None

    def public_keys(self) -> dict[str, bytes]:
        """The public key of every key that signed a checkpoint here (and of the current one)."""
        with self.sessions() as s:
            found = {r.key_id: bytes(r.public_key) for r in s.scalars(select(AuditSigningKey))}
        found[self.signer.key_id] = self.signer.public_raw
        return found

    # reading -----------------------------------------------------------------------------
    def get(self, event_id: str) -> dict[str, Any]:
        """One event: its position, leaf document and leaf hash (hex); NotFound when absent."""
        with self.sessions() as s:
            row = self._leaf_row(s, event_id)
            return _item(row)

    def _leaf_row(self, s: Session, event_id: str) -> AuditLeaf:
        row = (
            s.scalar(select(AuditLeaf).where(AuditLeaf.event_id == event_id)) if EVENT_ID.fullmatch(event_id) else None
        )
        if row is None:
            raise NotFound(f"no event {event_id[:64]!r} in the decision log")
        return row

    def payload(self, event_id: str) -> dict[str, Any]:
        """The event's inputs and outputs, decrypted: state ``kept``; else ``none`` (not kept),
        ``erased`` (its subject was erased), ``expired`` (past its tenant's retention) or
        ``unreadable`` (the ciphertext does not open: edited, or sealed under another key)."""
        state, found = self.opened(event_id)
        if found is None:
            return {"state": state}
        inputs, outputs = found
        shown: dict[str, Any] = {"state": state, "outputs": _tensors(outputs)}
        if inputs is not None:
            shown["inputs"] = _tensors(inputs)
        return shown

    def opened(self, event_id: str) -> tuple[str, tuple[bytes | None, bytes] | None]:
        """The payload's state (as ``payload`` names it) and, when ``kept``, the raw input and
        output blobs (codec-encoded)."""
        with self.sessions() as s:
            leaf = self._leaf_row(s, event_id)
            row = s.get(AuditPayload, leaf.event_id)
            if row is None:
                return "none", None
            key = self.keyring.data_key(s, row.data_key_id)
            if key is None:
                return ("erased" if self._erased_after(s, leaf, orjson.loads(leaf.body)) else "expired"), None
            if self._past_retention(s, leaf):
                return "expired", None
            try:
                return "kept", unpack_payload(open_sealed(key, row.nonce, row.ciphertext, leaf.event_id.encode()))
            except (Undecryptable, struct.error):
                return "unreadable", None

    def _erased_after(self, s: Session, leaf: AuditLeaf, doc: dict[str, Any]) -> bool:
        tenant = leaf.tenant or ""
        pseudonym = leaf.subject or self.keyring.pseudonym(
            tenant, subject_digest(tenant, key_subject(text(doc.get("key")))), create=False
        )
        if pseudonym is None:
            return False
        erasure = s.scalar(
            select(AuditLeaf.position)
            .where(
                AuditLeaf.tenant == tenant,
                AuditLeaf.subject == pseudonym,
                AuditLeaf.kind == "erasure",
                AuditLeaf.position > leaf.position,
            )
            .limit(1)
        )
        return erasure is not None

    def _past_retention(self, s: Session, leaf: AuditLeaf) -> bool:
        retain = s.scalar(select(Tenant.retain_payloads_s).where(Tenant.name == leaf.tenant))
        if not retain:
            return True
        at = leaf.at if leaf.at.tzinfo is not None else leaf.at.replace(tzinfo=UTC)
        return at.timestamp() + retain < time.time()

    def search(
        self,
        *,
        tenant: str | None = None,
        pseudonym: str | None = None,
        model: str | None = None,
        version: int | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Events matching every filter given, by position; at most ``limit`` (1 to 1000), after
        position ``after``. The next cursor (the last position) when there may be more."""
        limit = _page(limit)
        if kind is not None and kind not in KINDS:
            raise InvalidInput(f"kind is one of {', '.join(KINDS)}")
        if (pseudonym is not None or model is not None) and tenant is None:
            raise InvalidInput("a subject or model search needs its tenant")
        if version is not None and model is None:
            raise InvalidInput("a version search needs its model")
        query = select(AuditLeaf)
        for column, value in (
            (AuditLeaf.tenant, tenant),
            (AuditLeaf.subject, pseudonym),
            (AuditLeaf.model, model),
            (AuditLeaf.version, version),
            (AuditLeaf.kind, kind),
        ):
            if value is not None:
                query = query.where(column == value)
        if since is not None:
            query = query.where(AuditLeaf.at >= since)
        if until is not None:
            query = query.where(AuditLeaf.at < until)
        if after is not None:
            query = query.where(AuditLeaf.position > after)
        with self.sessions() as s:
            rows = list(s.scalars(query.order_by(AuditLeaf.position).limit(limit + 1)))
        more = len(rows) > limit
        items = [_item(r) for r in rows[:limit]]
        return items, (items[-1]["position"] if more else None)

    def leaves(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes, bytes]]:
        """Every stored leaf from position ``start`` (to ``end``, exclusive) as (position, body,
        leaf hash), in position order, read a page at a time."""
        at = start
        while True:
            query = select(AuditLeaf.position, AuditLeaf.body, AuditLeaf.leaf_hash).where(AuditLeaf.position >= at)
            if end is not None:
                query = query.where(AuditLeaf.position < end)
            with self.sessions() as s:
                page = s.execute(query.order_by(AuditLeaf.position).limit(MAX_PAGE)).all()
            for position, body, hashed in page:
                yield int(position), bytes(body), bytes(hashed)
            if len(page) < MAX_PAGE:
                return
            at = int(page[-1][0]) + 1

    def leaves_page(self, start: int = 0, limit: int = MAX_PAGE) -> list[tuple[int, bytes, bytes]]:
        """At most ``limit`` leaves from position ``start`` (for export pages)."""
        limit = _page(limit)
        if start < 0:
            raise InvalidInput("start is a position, 0 or more")
        with self.sessions() as s:
            rows = s.execute(
                select(AuditLeaf.position, AuditLeaf.body, AuditLeaf.leaf_hash)
                .where(AuditLeaf.position >= start)
                .order_by(AuditLeaf.position)
                .limit(limit)
            ).all()
        return [(int(p), bytes(b), bytes(h)) for p, b, h in rows]

    # proofs and verification -----------------------------------------------------------
    def inclusion(self, event_id: str, size: int | None = None) -> dict[str, Any]:
        """The inclusion proof of one event in the tree of ``size`` leaves (default: the latest
        checkpoint's), with that checkpoint when one was signed at that size."""
        item = self.get(event_id)
        position = item["position"]
        if size is None:
            latest = self.latest_checkpoint()
            if latest is None or latest.size <= position:
                raise Conflict(f"event {event_id!r} is not under a signed checkpoint yet; ask again in a second")
            size = latest.size
        self._check_size(size)
        if size <= position:
            raise InvalidInput(f"event {event_id!r} is at position {position}: not in a tree of {size}")
        with self.sessions() as s:
            perfect = self._perfect(s)
            proof = merkle.inclusion_proof(position, size, perfect)
            root = merkle.Frontier.from_perfect(size, perfect).root()
            signed = s.get(AuditCheckpoint, size)
        return {
            "position": position,
            "size": size,
            "leaf_hash": item["leaf_hash"],
            "root": root.hex(),
            "proof": [h.hex() for h in proof],
            "checkpoint": self.checkpoint_doc(_checkpoint(signed)) if signed is not None else None,
        }

    def consistency(self, first: int, second: int) -> dict[str, Any]:
        """The consistency proof between the trees of ``first`` and ``second`` leaves."""
        if not 0 < first <= second:
            raise InvalidInput("a consistency proof needs 0 < first <= second")
        self._check_size(second)
        with self.sessions() as s:
            perfect = self._perfect(s)
            proof = merkle.consistency_proof(first, second, perfect)
            roots = [merkle.Frontier.from_perfect(n, perfect).root().hex() for n in (first, second)]
        return {
            "first": first,
            "second": second,
            "first_root": roots[0],
            "second_root": roots[1],
            "proof": [h.hex() for h in proof],
        }

    def verify(self, start: int = 0, end: int | None = None) -> verifier.Report:
        """Recompute the tree from position ``start`` (to ``end``) against the signed
        checkpoints in that range (``audit/verify.py``); counts a failed verification."""
        if start < 0 or (end is not None and end < start):
            raise InvalidInput("verify needs 0 <= from <= to")
        self._check_size(start)
        frontier = self.frontier_at(start)
        with self.sessions() as s:
            query = select(AuditCheckpoint).where(AuditCheckpoint.size >= start)
            if end is not None:
                query = query.where(AuditCheckpoint.size <= end)
            checkpoints = [_checkpoint(r) for r in s.scalars(query.order_by(AuditCheckpoint.size))]
        report = verifier.verify(
            self.leaves(start, end),
            checkpoints,
            self.public_keys(),
            start=start,
            start_frontier=frontier,
            end=end,
            max_unverified=self.max_unverified if end is None else None,
        )
        report.findings += self._column_findings(start, end)
        report.ok = not report.findings
        if not report.ok:
            metrics.AUDIT_VERIFY_FAILURES.inc()
            log.error(
                "audit_verify_failed",
                findings=len(report.findings),
                first=report.findings[0].what if report.findings else "",
            )
        return report

    def _column_findings(self, start: int, end: int | None) -> list[verifier.Finding]:
        """A finding at each position whose searchable columns differ from its body (an edited
        column would change search results, not the tree); bodies that do not parse are left to
        the tree's check."""
        found: list[verifier.Finding] = []
        names = ("event_id", "kind", "at", "tenant", "subject", "model", "version")
        at = start
        while len(found) < verifier.MAX_FINDINGS:
            query = select(AuditLeaf.position, AuditLeaf.body, *(getattr(AuditLeaf, n) for n in names)).where(
                AuditLeaf.position >= at
            )
            if end is not None:
                query = query.where(AuditLeaf.position < end)
            with self.sessions() as s:
                page = s.execute(query.order_by(AuditLeaf.position).limit(MAX_PAGE)).all()
            for position, body, *stored in page:
                try:
                    doc = orjson.loads(body)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(doc, dict):
                    continue
                stored[2] = iso_utc(stored[2])
                expected = search_columns(doc)
                wrong = [n for n, value in zip(names, stored, strict=True) if value != expected[n]]
                if wrong:
                    found.append(
                        verifier.Finding(
                            int(position), None, f"searchable columns differ from the leaf: {', '.join(wrong)}"
                        )
                    )
            if len(page) < MAX_PAGE:
                break
            at = int(page[-1][0]) + 1
        return found[: verifier.MAX_FINDINGS]


def _insert(s: Session, table: type[Base], rows: list[dict[str, Any]]) -> None:
    """Insert plain rows (all with the same keys, in the same order) in ``s``'s transaction: on
    PostgreSQL with ``COPY`` (row-at-a-time statements cost the server a round each, even
    pipelined), on SQLite with the driver's ``executemany`` (SQLAlchemy's per-row parameter
    processing cost more than the insert)."""
    if not rows:
        return
    conn = s.connection()
    columns = list(rows[0])
    names = ", ".join(f'"{c}"' for c in columns)
    driver: Any = conn.connection.driver_connection
    if conn.dialect.name == "postgresql":
        with driver.cursor().copy(f"COPY {table.__tablename__} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[c] for c in columns])
    else:  # SQLite: the driver's own executemany, values bound as SQLAlchemy's column types bind them
        statement = str(insert(table).compile(dialect=conn.dialect, column_keys=columns))
        bind = [table.__table__.c[c].type.dialect_impl(conn.dialect).bind_processor(conn.dialect) for c in columns]
        values = [[v if p is None else p(v) for p, v in zip(bind, row.values(), strict=True)] for row in rows]
        cursor = driver.cursor()
        try:
            cursor.executemany(statement, values)
        finally:
            cursor.close()


def _counts(leaves: list[Leaf]) -> dict[str, int]:
    found: dict[str, int] = {}
    for leaf in leaves:
        found[leaf.kind] = found.get(leaf.kind, 0) + 1
    return found


def _page(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit is 1 to {MAX_PAGE}")
    return limit


def _item(row: AuditLeaf) -> dict[str, Any]:
    return {"position": int(row.position), "leaf": orjson.loads(row.body), "leaf_hash": bytes(row.leaf_hash).hex()}


def _checkpoint(row: AuditCheckpoint) -> Checkpoint:
    return Checkpoint(
        size=int(row.size),
        root=bytes(row.root),
        at_ms=int(row.at_ms),
        key_id=row.key_id,
        signature=bytes(row.signature),
    )
