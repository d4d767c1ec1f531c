"""Tamper evidence (issue 14, done-when 2): every single edit to the log is detected and named.

A log of synthetic leaves with signed checkpoints lives in real SQL tables (SQLite and PostgreSQL)
named and shaped like the decision log's (``audit_leaves``, ``audit_checkpoints``). Each of 1,000
random single edits is a real SQL statement (a byte of a body or of a stored hash, a deleted row,
two bodies swapped, whole rows swapped, a forged row inserted with the positions after it shifted,
the tail deleted, a checkpoint's signature or root replaced), made inside a transaction that is
rolled back after the check. After each, the verifier must report the first position (or the
checkpoint) that does not match. The same is then done to the files of an export for the offline
verifier, which reads neither Redis nor SQL.

Where a forger rewrites a row *consistently* (the stored hash recomputed, or rows moved whole),
only the signed roots can tell: the verifier then names the first checkpoint that fails and the
range of positions the edit lies in, and the test checks that the range holds the edited position.
"""

from __future__ import annotations

import base64
import os
import random
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)

from bastion.audit import merkle
from bastion.audit.export import read_export, verify_offline, write_export
from bastion.audit.signing import Checkpoint, Signer, checkpoint_message, key_id, verify_signature
from bastion.audit.verify import MAX_FINDINGS, Report, verify
from bastion.errors import Conflict, InvalidInput
from bastion.registry import db

LEAVES = 1_000
EDITS = 1_000
SEED = int(os.environ.get("BASTION_TAMPER_SEED", random.randrange(2**32)))

# The decision log's two tables, as far as verification reads them (same names and columns as
# bastion.audit.tables: point ``verify_sql`` at those and the test runs against the real log).
metadata = MetaData()
leaves_table = Table(
    "audit_leaves",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("event_id", String(64), unique=True, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("leaf_hash", LargeBinary, nullable=False),
)
checkpoints_table = Table(
    "audit_checkpoints",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root", LargeBinary, nullable=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("signature", LargeBinary, nullable=False),
)


@dataclass
class Log:
    """The pristine log: bodies by position, its signed checkpoints and the keys."""

    bodies: list[bytes]
    checkpoints: list[Checkpoint]
    signer: Signer
    stranger: Signer  # a key the verifier does not trust

    @property
    def keys(self) -> dict[str, bytes]:
        return {self.signer.key_id: self.signer.public_raw}

    @property
    def sizes(self) -> list[int]:
        return [c.size for c in self.checkpoints]

    def covering(self, position: int) -> tuple[int, int]:
        """The range ``[previous checkpoint size, size)`` of the first checkpoint that covers ``position``."""
        previous = 0
        for size in self.sizes:
            if size > position:
                return previous, size
            previous = size
        raise AssertionError(f"no checkpoint covers position {position}")


def _body(rng: random.Random, position: int) -> bytes:
    doc = {
        "v": 1,
        "kind": "decision",
        "id": f"job-{position:06d}-{rng.randrange(16**8):08x}",
        "at": f"2030-01-01T00:00:{position % 60:02d}.000Z",
        "tenant": rng.choice(["acme", "globex", "initech"]),
        "subject": f"{rng.randrange(2**128):032x}",
        "model": "credit",
        "version": rng.randint(1, 9),
        "input_sha256": f"{rng.randrange(2**256):064x}",
        "latency_ms": round(rng.uniform(0.5, 90.0), 3),
        "payload": "none",
    }
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


def build_log(tmp_path: Path, rng: random.Random, size: int = LEAVES) -> Log:
    """``size`` leaves, a checkpoint every 50-150 leaves and one at the end, signed by a real key."""
    signer = Signer.create(tmp_path / "keys" / "checkpoint.pem")
    stranger = Signer.create(tmp_path / "keys" / "stranger.pem")
    bodies = [_body(rng, p) for p in range(size)]
    frontier = merkle.Frontier()
    checkpoints = []
    next_at = rng.randint(50, 150)
    for position, body in enumerate(bodies):
        frontier.append(merkle.leaf_hash(body))
        if frontier.size in (next_at, size):
            checkpoints.append(signer.checkpoint(frontier.size, frontier.root(), 1_900_000_000_000 + position))
            next_at += rng.randint(50, 150)
    return Log(bodies, checkpoints, signer, stranger)


def store(engine: Engine, log: Log) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(leaves_table),
            [
                {"position": p, "event_id": orjson.loads(b)["id"], "body": b, "leaf_hash": merkle.leaf_hash(b)}
                for p, b in enumerate(log.bodies)
            ],
        )
        conn.execute(
            insert(checkpoints_table),
            [
                {"size": c.size, "root": c.root, "at_ms": c.at_ms, "key_id": c.key_id, "signature": c.signature}
                for c in log.checkpoints
            ],
        )


def verify_sql(conn: Connection, keys: dict[str, bytes]) -> Report:
    """The online verification: rows straight from SQL, in position order, into the one verifier."""
    cps = [
        Checkpoint(int(r.size), bytes(r.root), int(r.at_ms), r.key_id, bytes(r.signature))
        for r in conn.execute(select(checkpoints_table).order_by(checkpoints_table.c.size))
    ]
    rows = conn.execute(
        select(leaves_table.c.position, leaves_table.c.body, leaves_table.c.leaf_hash).order_by(leaves_table.c.position)
    )
    return verify(((int(p), bytes(b), bytes(h)) for p, b, h in rows), cps, keys)


@dataclass(frozen=True)
class Expect:
    """What the first finding must say."""

    position: int | None
    checkpoint_size: int | None
    mentions: str = ""


def _flip(value: bytes, at: int, rng: random.Random) -> bytes:
    return value[:at] + bytes([value[at] ^ rng.randint(1, 255)]) + value[at + 1 :]


def _forged(log: Log, rng: random.Random) -> bytes:
    return _body(rng, rng.randrange(len(log.bodies)))


def _consistent(log: Log, position: int) -> Expect:
    """A consistent forgery at ``position``: the first checkpoint over it fails, naming the range."""
    previous, size = log.covering(position)
    assert previous <= position < size
    return Expect(None, size, f"positions {previous}–{size - 1}")


def _two(rng: random.Random, n: int) -> tuple[int, int]:
    p, q = sorted(rng.sample(range(n), 2))
    return p, q


# -- edits to the SQL tables (each returns what the verifier must name)

Edit = Callable[[Connection, Log, random.Random], Expect]


def sql_body_byte(conn: Connection, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(log.bodies))
    body = log.bodies[p]
    conn.execute(
        update(leaves_table).where(leaves_table.c.position == p).values(body=_flip(body, rng.randrange(len(body)), rng))
    )
    return Expect(p, None, "the body was changed")


def sql_leaf_hash_byte(conn: Connection, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(log.bodies))
    digest = merkle.leaf_hash(log.bodies[p])
    conn.execute(
        update(leaves_table).where(leaves_table.c.position == p).values(leaf_hash=_flip(digest, rng.randrange(32), rng))
    )
    return Expect(p, None, "the stored hash was changed")


def sql_delete_row(conn: Connection, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(log.bodies))
    conn.execute(delete(leaves_table).where(leaves_table.c.position == p))
    return Expect(p, log.sizes[-1]) if p == len(log.bodies) - 1 else Expect(p, None, "missing")


def sql_swap_bodies(conn: Connection, log: Log, rng: random.Random) -> Expect:
    p, q = _two(rng, len(log.bodies))
    conn.execute(update(leaves_table).where(leaves_table.c.position == p).values(body=log.bodies[q]))
    conn.execute(update(leaves_table).where(leaves_table.c.position == q).values(body=log.bodies[p]))
    return Expect(p, None, "does not hash")


def sql_swap_rows(conn: Connection, log: Log, rng: random.Random) -> Expect:
    """Two rows exchanged whole (body and stored hash): each row is self-consistent."""
    p, q = _two(rng, len(log.bodies))
    for a, b in ((p, q), (q, p)):
        body = log.bodies[b]
        conn.execute(
            update(leaves_table).where(leaves_table.c.position == a).values(body=body, leaf_hash=merkle.leaf_hash(body))
        )
    return _consistent(log, p)


def sql_insert_forged(conn: Connection, log: Log, rng: random.Random) -> Expect:
    """A forged row at ``p`` with a correct leaf hash, every later row moved up one position."""
    p = rng.randrange(len(log.bodies))
    position = leaves_table.c.position
    # Two steps, so that no statement ever holds two rows at one position (PostgreSQL checks each row).
    conn.execute(update(leaves_table).where(position >= p).values(position=-position - 1))
    conn.execute(update(leaves_table).where(position < 0).values(position=-position))
    forged = _forged(log, rng)
    conn.execute(
        insert(leaves_table).values(position=p, event_id="forged", body=forged, leaf_hash=merkle.leaf_hash(forged))
    )
    return _consistent(log, p)


def sql_truncate_tail(conn: Connection, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(log.bodies))
    conn.execute(delete(leaves_table).where(leaves_table.c.position >= p))
    return Expect(p, min(s for s in log.sizes if s > p), "truncated")


def _checkpoint(log: Log, rng: random.Random) -> Checkpoint:
    return rng.choice(log.checkpoints)


def sql_replace_signature(conn: Connection, log: Log, rng: random.Random) -> Expect:
    cp = _checkpoint(log, rng)
    other = rng.choice([c for c in log.checkpoints if c.size != cp.size])
    how = rng.randrange(4)
    values: dict[str, object]
    if how == 0:  # a byte of it changed
        values = {"signature": _flip(cp.signature, rng.randrange(64), rng)}
    elif how == 1:  # another checkpoint's signature
        values = {"signature": other.signature}
    elif how == 2:  # re-signed by a key the verifier does not trust, under the log's key id
        values = {"signature": log.stranger.sign(cp.message())}
    else:  # re-signed by that key, under its own key id
        values = {"signature": log.stranger.sign(cp.message()), "key_id": log.stranger.key_id}
    conn.execute(update(checkpoints_table).where(checkpoints_table.c.size == cp.size).values(**values))
    return Expect(None, cp.size, "unknown key id" if how == 3 else "signature does not verify")


def sql_change_root(conn: Connection, log: Log, rng: random.Random) -> Expect:
    cp = _checkpoint(log, rng)
    root = _flip(cp.root, rng.randrange(32), rng)
    conn.execute(update(checkpoints_table).where(checkpoints_table.c.size == cp.size).values(root=root))
    return Expect(None, cp.size, "signature does not verify")


SQL_EDITS: dict[str, Edit] = {
    "body byte": sql_body_byte,
    "leaf hash byte": sql_leaf_hash_byte,
    "delete row": sql_delete_row,
    "swap bodies": sql_swap_bodies,
    "swap rows": sql_swap_rows,
    "insert forged row": sql_insert_forged,
    "truncate tail": sql_truncate_tail,
    "replace signature": sql_replace_signature,
    "change root": sql_change_root,
}


def check(report: Report, expect: Expect, label: str) -> None:
    assert not report.ok, f"{label}: not detected"
    first = report.findings[0]
    named = (first.position, first.checkpoint_size)
    assert named == (expect.position, expect.checkpoint_size), f"{label}: named {named} ({first.what})"
    assert expect.mentions in first.what, f"{label}: {first.what!r} lacks {expect.mentions!r}"


@pytest.fixture
def log(tmp_path: Path) -> Log:
    return build_log(tmp_path, random.Random(SEED))


def test_every_single_sql_edit_is_detected_and_named(database_url: str, log: Log) -> None:
    """1,000 random single edits to the SQL tables: 1,000 detected, each naming the right position."""
    engine = db.engine_for(database_url)
    try:
        store(engine, log)
        rng = random.Random(SEED + 1)
        detected: dict[str, int] = dict.fromkeys(SQL_EDITS, 0)
        with engine.connect() as conn:
            assert verify_sql(conn, log.keys).ok
            conn.rollback()
            for n in range(EDITS):
                kind = rng.choice(sorted(SQL_EDITS))
                with conn.begin() as tx:
                    expect = SQL_EDITS[kind](conn, log, rng)
                    report = verify_sql(conn, log.keys)
                    tx.rollback()
                check(report, expect, f"edit {n} ({kind}, seed {SEED})")
                detected[kind] += 1
            pristine = verify_sql(conn, log.keys)  # every edit was rolled back
        assert pristine.ok and pristine.checkpoints_checked == len(log.checkpoints), pristine.findings
        assert sum(detected.values()) == EDITS and all(detected.values()), detected
    finally:
        engine.dispose()


# -- the same edits to an export's files, for the offline verifier


@dataclass
class Files:
    events: list[bytes]
    checkpoints: list[bytes]


FileEdit = Callable[[Files, Log, random.Random], Expect]


def _event(line: bytes) -> dict[str, object]:
    data = orjson.loads(line)
    assert isinstance(data, dict)
    return data


def _line(data: dict[str, object]) -> bytes:
    return orjson.dumps(data) + b"\n"


def _body_of(line: bytes) -> bytes:
    return base64.b64decode(str(_event(line)["body"]))


def file_body_byte(files: Files, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(files.events))
    body = _body_of(files.events[p])
    files.events[p] = _line(
        {**_event(files.events[p]), "body": base64.b64encode(_flip(body, rng.randrange(len(body)), rng)).decode()}
    )
    return Expect(p, None, "the body was changed")


def file_leaf_hash(files: Files, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(files.events))
    digest = bytes.fromhex(str(_event(files.events[p])["leaf_hash"]))
    files.events[p] = _line({**_event(files.events[p]), "leaf_hash": _flip(digest, rng.randrange(32), rng).hex()})
    return Expect(p, None, "the stored hash was changed")


def file_delete_line(files: Files, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(files.events))
    del files.events[p]
    return Expect(p, log.sizes[-1]) if p == len(log.bodies) - 1 else Expect(p, None, "missing")


def file_swap_bodies(files: Files, log: Log, rng: random.Random) -> Expect:
    p, q = _two(rng, len(files.events))
    a, b = _event(files.events[p]), _event(files.events[q])
    files.events[p], files.events[q] = _line({**a, "body": b["body"]}), _line({**b, "body": a["body"]})
    return Expect(p, None, "does not hash")


def file_swap_lines(files: Files, log: Log, rng: random.Random) -> Expect:
    """Two whole lines exchanged, their position fields with them: out of sequence at the first."""
    p, q = _two(rng, len(files.events))
    files.events[p], files.events[q] = files.events[q], files.events[p]
    return Expect(p, None, "missing")


def file_insert_forged(files: Files, log: Log, rng: random.Random) -> Expect:
    """A forged line at ``p`` (correct leaf hash), every later position field moved up one."""
    p = rng.randrange(len(files.events))
    forged = _forged(log, rng)
    moved = [_line({**_event(line), "position": p + 1 + i}) for i, line in enumerate(files.events[p:])]
    new = {"position": p, "leaf_hash": merkle.leaf_hash(forged).hex(), "body": base64.b64encode(forged).decode()}
    files.events[p:] = [_line(new), *moved]
    return _consistent(log, p)


def file_insert_duplicate(files: Files, log: Log, rng: random.Random) -> Expect:
    """A forged line claiming position ``p`` slipped in before the real one (positions not moved)."""
    p = rng.randrange(len(files.events))
    forged = _forged(log, rng)
    new = {"position": p, "leaf_hash": merkle.leaf_hash(forged).hex(), "body": base64.b64encode(forged).decode()}
    files.events.insert(p, _line(new))
    return Expect(p, None, "appears twice")


def file_truncate_tail(files: Files, log: Log, rng: random.Random) -> Expect:
    p = rng.randrange(len(files.events))
    del files.events[p:]
    return Expect(p, min(s for s in log.sizes if s > p), "truncated")


def file_garbage(files: Files, log: Log, rng: random.Random) -> Expect:
    """A line damaged so that it no longer parses (a byte overwritten, or the line cut short)."""
    p = rng.randrange(len(files.events))
    line = files.events[p]
    if rng.random() < 0.5:
        at = rng.randrange(len(line) - 1)
        files.events[p] = line[:at] + b"\xff" + line[at + 1 :]
    else:
        files.events[p] = line[: rng.randrange(1, len(line) - 2)] + b"\n"
    return Expect(p, None)


def file_replace_signature(files: Files, log: Log, rng: random.Random) -> Expect:
    i = rng.randrange(len(files.checkpoints))
    data = orjson.loads(files.checkpoints[i])
    cp = Checkpoint.from_dict(data)
    data["signature"] = (
        _flip(cp.signature, rng.randrange(64), rng) if rng.random() < 0.5 else log.stranger.sign(cp.message())
    ).hex()
    files.checkpoints[i] = _line(data)
    return Expect(None, cp.size, "signature does not verify")


def file_change_root(files: Files, log: Log, rng: random.Random) -> Expect:
    i = rng.randrange(len(files.checkpoints))
    data = orjson.loads(files.checkpoints[i])
    cp = Checkpoint.from_dict(data)
    data["root"] = _flip(cp.root, rng.randrange(32), rng).hex()
    files.checkpoints[i] = _line(data)
    return Expect(None, cp.size, "signature does not verify")


FILE_EDITS: dict[str, FileEdit] = {
    "body byte": file_body_byte,
    "leaf hash": file_leaf_hash,
    "delete line": file_delete_line,
    "swap bodies": file_swap_bodies,
    "swap lines": file_swap_lines,
    "insert forged line": file_insert_forged,
    "insert duplicate line": file_insert_duplicate,
    "truncate tail": file_truncate_tail,
    "garbage": file_garbage,
    "replace signature": file_replace_signature,
    "change root": file_change_root,
}


def _export_from_sql(engine: Engine, log: Log, out: Path) -> None:
    with engine.connect() as conn:
        cps = [
            Checkpoint(int(r.size), bytes(r.root), int(r.at_ms), r.key_id, bytes(r.signature))
            for r in conn.execute(select(checkpoints_table).order_by(checkpoints_table.c.size))
        ]
        rows = conn.execute(
            select(leaves_table.c.position, leaves_table.c.body, leaves_table.c.leaf_hash).order_by(
                leaves_table.c.position
            )
        )
        write_export(out, ((int(p), bytes(b), bytes(h)) for p, b, h in rows), cps, log.keys)


def test_the_offline_verifier_detects_the_same_edits_in_an_export(tmp_path: Path, log: Log) -> None:
    """1,000 random single edits to the files of an export (from SQLite): 1,000 detected and named."""
    engine = db.engine_for(f"sqlite:///{tmp_path / 'log.db'}")
    try:
        store(engine, log)
        out = tmp_path / "export"
        _export_from_sql(engine, log, out)
    finally:
        engine.dispose()
    assert verify_offline(out).ok
    events, checkpoints = out / "events.jsonl", out / "checkpoints.jsonl"
    pristine = Files(events.read_bytes().splitlines(keepends=True), checkpoints.read_bytes().splitlines(keepends=True))
    rng = random.Random(SEED + 2)
    detected: dict[str, int] = dict.fromkeys(FILE_EDITS, 0)
    for n in range(EDITS):
        kind = rng.choice(sorted(FILE_EDITS))
        files = Files(list(pristine.events), list(pristine.checkpoints))
        expect = FILE_EDITS[kind](files, log, rng)
        events.write_bytes(b"".join(files.events))
        checkpoints.write_bytes(b"".join(files.checkpoints))
        check(verify_offline(out), expect, f"edit {n} ({kind}, seed {SEED})")
        detected[kind] += 1
    events.write_bytes(b"".join(pristine.events))
    checkpoints.write_bytes(b"".join(pristine.checkpoints))
    report = verify_offline(out)
    assert report.ok and report.checkpoints_checked == len(log.checkpoints)
    assert sum(detected.values()) == EDITS and all(detected.values()), detected


# -- the verifier's other guarantees


def _rows(log: Log, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes, bytes]]:
    for p in range(start, len(log.bodies) if end is None else end):
        yield p, log.bodies[p], merkle.leaf_hash(log.bodies[p])


def _frontier(log: Log, size: int) -> list[bytes]:
    frontier = merkle.Frontier()
    for body in log.bodies[:size]:
        frontier.append(merkle.leaf_hash(body))
    return frontier.nodes


@pytest.fixture
def small(tmp_path: Path) -> Log:
    return build_log(tmp_path, random.Random(SEED), size=600)


def test_a_pristine_log_verifies_and_reports_its_coverage(small: Log) -> None:
    report = verify(_rows(small), small.checkpoints, small.keys)
    assert report.ok and report.findings == []
    assert report.to_dict() == {
        "ok": True,
        "size": 600,
        "first_position": 0,
        "checkpoints_checked": len(small.checkpoints),
        "last_verified_size": 600,
        "unverified_tail": 0,
        "findings": [],
    }


def test_leaves_after_the_last_checkpoint_are_the_unverified_tail(small: Log) -> None:
    extra = _body(random.Random(1), 600)
    rows = [*_rows(small), (600, extra, merkle.leaf_hash(extra))]
    report = verify(rows, small.checkpoints, small.keys)
    assert report.ok and report.unverified_tail == 1 and report.last_verified_size == 600


def test_a_range_starts_from_the_stored_frontier(small: Log) -> None:
    """From a position inside the log: the frontier there stands in for the leaves before it, a
    checkpoint at exactly that size checks it, and ``end`` leaves later checkpoints out."""
    start = small.sizes[2]
    end = small.sizes[-2]
    report = verify(_rows(small, start, end), small.checkpoints, small.keys, start, _frontier(small, start), end=end)
    assert report.ok, report.findings
    assert report.first_position == start and report.size == end - start
    assert report.checkpoints_checked == len(small.sizes) - 3  # sizes[2] (the frontier) up to sizes[-2]
    forged = [b"\x00" * 32] * len(_frontier(small, start))
    report = verify(_rows(small, start, end), small.checkpoints, small.keys, start, forged, end=end)
    assert report.findings[0].checkpoint_size == start
    with pytest.raises(InvalidInput, match="frontier"):
        verify(_rows(small, start), small.checkpoints, small.keys, start)
    with pytest.raises(InvalidInput, match="malformed"):
        verify(_rows(small, start), small.checkpoints, small.keys, start, [*forged, b"\x00" * 32])


def test_an_empty_log_verifies_and_an_empty_log_under_checkpoints_is_truncated(small: Log) -> None:
    assert verify([], [], {}).ok
    report = verify([], small.checkpoints, small.keys)
    assert (report.findings[0].position, report.findings[0].checkpoint_size) == (0, small.sizes[0])


def test_checkpoints_out_of_order_and_unknown_keys_are_findings(small: Log) -> None:
    cps = [small.checkpoints[1], small.checkpoints[0], *small.checkpoints[2:]]
    report = verify(_rows(small), cps, small.keys)
    assert [f.checkpoint_size for f in report.findings] == [small.sizes[0]]
    assert "out of order" in report.findings[0].what
    report = verify(_rows(small), small.checkpoints, {})
    assert len(report.findings) == len(small.checkpoints) and all("unknown key" in f.what for f in report.findings)


def test_a_key_filed_under_another_id_verifies_nothing(small: Log) -> None:
    report = verify(_rows(small), small.checkpoints, {small.signer.key_id: small.stranger.public_raw})
    assert not report.ok and report.checkpoints_checked == 0


def test_findings_are_capped_and_counted(small: Log) -> None:
    rows = [(p, body + b" ", digest) for p, body, digest in _rows(small)]
    report = verify(rows, small.checkpoints, small.keys)
    assert len(report.findings) == MAX_FINDINGS + 1
    assert report.findings[-1].position is None and "more findings" in report.findings[-1].what


# -- checkpoints and their keys


def test_checkpoint_message_is_the_documented_text() -> None:
    root = bytes(range(32))
    assert checkpoint_message(7, root, 1_900_000_000_123) == (
        b"bastion-audit-checkpoint/v1\n7\n" + root.hex().encode() + b"\n1900000000123\n"
    )


def test_a_development_key_is_created_private_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "checkpoint.pem"
    signer = Signer.create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = Signer.load(path)
    assert loaded.public_raw == signer.public_raw and len(signer.public_raw) == 32
    assert signer.key_id == key_id(signer.public_raw) and len(signer.key_id) == 32
    assert signer.public_pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in repr(signer)
    message = checkpoint_message(1, b"\x01" * 32, 5)
    assert verify_signature(signer.public_raw, message, loaded.sign(message))
    assert not verify_signature(signer.public_raw, message + b"x", loaded.sign(message))
    assert not verify_signature(b"short", message, loaded.sign(message))
    with pytest.raises(FileExistsError):
        Signer.create(path)


def test_only_ed25519_pkcs8_keys_are_accepted(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "rsa.pem").write_bytes(rsa_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with pytest.raises(ValueError, match="Ed25519 only"):
        Signer.load(tmp_path / "rsa.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a key")
    with pytest.raises(ValueError, match="PEM"):
        Signer.load(tmp_path / "junk.pem")
    with pytest.raises(ValueError, match="cannot read"):
        Signer.load(tmp_path / "missing.pem")


def test_checkpoint_dicts_round_trip_and_bad_ones_are_refused(small: Log) -> None:
    cp = small.checkpoints[0]
    doc = cp.to_dict()
    assert doc["at"].endswith("Z") and Checkpoint.from_dict(doc) == cp
    assert Checkpoint.from_dict(orjson.loads(orjson.dumps(doc))).verifies(small.signer.public_raw)
    for field, bad in [("size", -1), ("size", True), ("at_ms", "1"), ("root", "zz"), ("root", "00"), ("key_id", "")]:
        with pytest.raises(InvalidInput, match=field):
            Checkpoint.from_dict({**doc, field: bad})
    with pytest.raises(InvalidInput):
        Checkpoint.from_dict([1, 2])


# -- the export directory


def test_an_export_of_a_range_reads_back_and_verifies(tmp_path: Path, small: Log) -> None:
    start = small.sizes[1]
    out = tmp_path / "range"
    manifest = write_export(out, _rows(small, start), small.checkpoints, small.keys, start, _frontier(small, start))
    assert manifest["start"] == start and manifest["end"] == 600 and manifest["leaves"] == 600 - start
    contents = read_export(out)
    assert contents.start == start and contents.public_keys == small.keys
    report = verify_offline(out)
    assert report.ok and report.first_position == start, report.findings
    with pytest.raises(Conflict):
        write_export(out, [], [], small.keys)


def test_a_re_signed_export_fails_against_pinned_keys(tmp_path: Path, small: Log) -> None:
    """Whoever rewrites the files can re-sign them under a key of their own; pinned keys catch it."""
    body = small.bodies[10] + b" "
    rows = [(p, body if p == 10 else b, merkle.leaf_hash(body) if p == 10 else h) for p, b, h in _rows(small)]
    frontier = merkle.Frontier()
    resigned = []
    sizes = set(small.sizes)
    for _, _, digest in rows:
        frontier.append(digest)
        if frontier.size in sizes:
            resigned.append(small.stranger.checkpoint(frontier.size, frontier.root(), 0))
    out = tmp_path / "forged"
    write_export(out, rows, resigned, {small.stranger.key_id: small.stranger.public_raw})
    assert verify_offline(out).ok  # self-consistent: the files alone cannot tell
    report = verify_offline(out, trusted_keys=small.keys)
    assert not report.ok and report.checkpoints_checked == 0


def test_an_unreadable_export_is_refused(tmp_path: Path, small: Log) -> None:
    with pytest.raises(InvalidInput, match="MANIFEST"):
        verify_offline(tmp_path)
    out = tmp_path / "export"
    write_export(out, _rows(small), small.checkpoints, small.keys)
    (out / "frontier.json").write_text('{"size": 3, "nodes": []}')
    with pytest.raises(InvalidInput, match="frontier"):
        verify_offline(out)


def test_a_log_whose_checkpoints_were_all_removed_does_not_verify_where_a_tail_is_bounded() -> None:
    """Deleting every checkpoint (and rewriting the leaves with matching hashes) leaves nothing
    signed to compare with: the leaves are then an unverified tail, which an export (it ends at a
    checkpoint) and the live log (bounded by the checkpoint cadence) both refuse."""
    forged = [(i, b"forged %d" % i, merkle.leaf_hash(b"forged %d" % i)) for i in range(5)]
    assert verify(forged, [], {}).ok, "unbounded: a tail alone is only reported"
    report = verify(forged, [], {}, max_unverified=0)
    assert not report.ok and report.findings[0].position == 0
    assert "no signed checkpoint" in report.findings[0].what
