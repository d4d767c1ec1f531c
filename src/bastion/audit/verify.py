"""The one verifier of the decision log: the same code checks SQL rows online and an export offline.

``verify`` streams the leaves in position order, recomputes each leaf hash from its canonical
body, rebuilds the tree with a ``Frontier`` (``O(log n)`` memory: a million leaves are a few
seconds and a few kilobytes), and checks every signed checkpoint it reaches: the signature under a
known key, and the root against the leaves. It never stops at the first problem and never raises on
bad data; it returns a ``Report`` whose ``findings`` are in position order, so ``findings[0]`` is
the first position that does not match.

What it names, for each kind of single edit:

==============================  ===================================================================
edit                            finding
==============================  ===================================================================
a byte of a body changed        that position: the body does not hash to the stored leaf hash (and
                                the next checkpoint's root fails: the body is not the signed one)
a stored leaf hash changed      that position (the next checkpoint verifies: the body is intact)
bodies of two rows swapped      the lower position
a row deleted                   the missing position (a gap)
rows duplicated or reordered    the first position out of sequence
the tail deleted                the first missing position: a checkpoint's size is beyond the rows
a checkpoint's signature or     that checkpoint (``checkpoint_size``): its signature does not verify
root changed; unknown key id    under the key its ``key_id`` names
a row forged *consistently*     the first checkpoint whose root does not match, and the range
(hash recomputed, positions     ``[last verified size, its size)`` the edit lies in; ``position`` is
shifted by an insert, rows      None, because nothing but the signed roots can tell which leaf of
swapped whole)                  that range is not the signed one
==============================  ===================================================================

Leaves after the last checkpoint are checked against their stored hashes only: ``unverified_tail``
says how many there are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bastion.audit.merkle import Frontier
from bastion.audit.signing import Checkpoint
from bastion.errors import InvalidInput

MAX_FINDINGS = 100
"""Findings past this many are counted, not listed (a broken log would otherwise list every leaf)."""


@dataclass(slots=True)
class Finding:
    """One thing that does not match: at a leaf ``position``, or at the checkpoint of ``checkpoint_size``."""

    position: int | None
    checkpoint_size: int | None
    what: str

    def to_dict(self) -> dict[str, Any]:
        return {"position": self.position, "checkpoint_size": self.checkpoint_size, "what": self.what}


@dataclass(slots=True)
class Report:
    """The outcome of one verification; ``ok`` exactly when there are no findings.

    ``size`` counts the leaf rows read, from ``first_position``; ``last_verified_size`` is the size
    of the last checkpoint whose signature and root both matched (None if none did);
    ``unverified_tail`` counts the leaves after the last checkpoint, which no signature covers yet."""

    ok: bool
    size: int
    first_position: int
    checkpoints_checked: int
    last_verified_size: int | None
    findings: list[Finding] = field(default_factory=list)
    unverified_tail: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "size": self.size,
            "first_position": self.first_position,
            "checkpoints_checked": self.checkpoints_checked,
            "last_verified_size": self.last_verified_size,
            "unverified_tail": self.unverified_tail,
            "findings": [f.to_dict() for f in self.findings],
        }

    def including(self, extra: Iterable[Finding]) -> Report:
        """This report with ``extra`` findings merged in position order, ahead of this report's own
        at the same position (``ok`` follows)."""
        findings = sorted([*extra, *self.findings], key=_order)
        return Report(
            not findings,
            self.size,
            self.first_position,
            self.checkpoints_checked,
            self.last_verified_size,
            findings,
            self.unverified_tail,
        )


def verify(
    leaves: Iterable[tuple[int, bytes, bytes]],
    checkpoints: Iterable[Checkpoint],
    public_keys: dict[str, bytes],
    start: int = 0,
    start_frontier: Sequence[bytes] | None = None,
    *,
    end: int | None = None,
    max_unverified: int | None = None,
) -> Report:
    """Verify ``leaves`` (``(position, canonical body, stored leaf hash)`` in position order, from
    ``start``) against ``checkpoints`` (in increasing size) signed by ``public_keys`` (key id → raw
    Ed25519 public key).

    From ``start > 0``, ``start_frontier`` is the frontier of the first ``start`` leaves (as stored:
    it is trusted, and checked only by a checkpoint of size exactly ``start`` when there is one);
    checkpoints of a smaller size are skipped. With ``end``, checkpoints of a size above ``end`` are
    ignored (verify a range without calling the rest of the log truncated). ``max_unverified``
    bounds the leaves no checkpoint covers: more is a finding (checkpoints were deleted, or a
    tail was forged without a signature); an export, which ends at a checkpoint, allows 0.

    ``InvalidInput`` only for arguments that cannot describe a log (a negative start, a frontier of
    the wrong shape); everything about the data itself is a finding."""
    if start < 0:
        raise InvalidInput("a verification starts at position 0 or later")
    if start > 0 and start_frontier is None:
        raise InvalidInput(f"verifying from position {start} needs the frontier of the first {start} leaves")
    try:
        frontier = Frontier(start, list(start_frontier or ()))
    except ValueError as exc:
        raise InvalidInput(f"the frontier at position {start} is malformed: {exc}") from None
    run = _Run(frontier, public_keys, start, end)
    run.feed(leaves, iter(checkpoints))
    report = run.report()
    if report.ok and max_unverified is not None and report.unverified_tail > max_unverified:
        first = report.first_position + report.size - report.unverified_tail
        report = report.including(
            [
                Finding(
                    first,
                    None,
                    f"{report.unverified_tail} leaves from position {first} are covered by no signed checkpoint (at "
                    f"most {max_unverified} may be): checkpoints were removed or the tail was forged",
                )
            ]
        )
    return report


class _Run:
    """The state of one verification: the frontier, the next checkpoint, the findings so far."""

    def __init__(self, frontier: Frontier, public_keys: dict[str, bytes], start: int, end: int | None) -> None:
        self.frontier = frontier
        self.public_keys = public_keys
        self.start = start
        self.end = end
        self.expected = start  # the next position a contiguous log would hold
        self.count = 0
        self.findings: list[Finding] = []
        self.dropped = 0
        self.broken_at: int | None = None  # the first position out of sequence: no root is comparable after it
        self.out_of_sequence = 0
        self.diverged = False  # a root failed: later roots cannot match either, so they are not re-reported
        self.checked = 0
        self.last_verified: int | None = None
        self.last_good = start  # the lower end of the range the next root vouches for
        self.last_checkpoint_size = -1
        self.covered = start  # the largest checkpoint size seen (leaves past it are the unverified tail)
        self.since_checkpoint: list[Finding] = []  # leaf-hash findings the next root will explain
        self.truncation_reported = False

    # -- findings

    def add(self, finding: Finding) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(finding)
        else:
            self.dropped += 1

    # -- the stream

    def feed(self, leaves: Iterable[tuple[int, bytes, bytes]], checkpoints: Iterator[Checkpoint]) -> None:
        pending = self._next_checkpoint(checkpoints)
        while pending is not None and pending.size <= self.start:
            if pending.size == self.start:
                self._reach(pending)
            pending = self._next_checkpoint(checkpoints)
        sha256 = hashlib.sha256
        push = self.frontier.push
        expected = self.expected  # (locals: this loop runs once a leaf)
        target = pending.size if pending is not None else -1
        count = 0
        for count, (position, body, stored) in enumerate(leaves, 1):  # noqa: B007 (count is read after the loop)
            digest = sha256(b"\x00" + body).digest()
            if position == expected and self.broken_at is None:
                if digest != stored:
                    self._leaf_mismatch(position)
                push(digest)
                expected += 1
                if expected != target:
                    continue
            else:
                self.expected = expected
                self._out_of_line(position, digest, stored)
                expected = self.expected
            self.expected = expected
            while pending is not None and pending.size <= expected:
                self._reach(pending)
                pending = self._next_checkpoint(checkpoints)
            target = pending.size if pending is not None else -1
        self.count = count
        self.expected = expected
        while pending is not None:  # checkpoints past the last row
            self._beyond_rows(pending)
            pending = self._next_checkpoint(checkpoints)

    def _next_checkpoint(self, checkpoints: Iterator[Checkpoint]) -> Checkpoint | None:
        for checkpoint in checkpoints:
            if self.end is not None and checkpoint.size > self.end:
                return None
            if checkpoint.size <= self.last_checkpoint_size:
                self.add(
                    Finding(
                        None,
                        checkpoint.size,
                        f"checkpoint of size {checkpoint.size} comes after size {self.last_checkpoint_size}: "
                        "checkpoints out of order or repeated",
                    )
                )
                continue
            self.last_checkpoint_size = checkpoint.size
            return checkpoint
        return None

    def _leaf_mismatch(self, position: int) -> None:
        finding = Finding(position, None, "the body does not hash to the stored leaf hash")
        self.add(finding)
        self.since_checkpoint.append(finding)

    def _out_of_line(self, position: int, digest: bytes, stored: bytes) -> None:
        """A leaf whose position breaks the sequence (or any leaf once it is broken).

        The first break is named; later leaves out of sequence are only counted (after one break
        every position would be off). Their hashes are still checked against their bodies."""
        expected = self.expected
        if self.broken_at is None:
            self.broken_at = expected
            if position > expected:
                missing = f"position {expected}" if position == expected + 1 else f"positions {expected}–{position - 1}"
                self.add(Finding(expected, None, f"{missing} missing: the next row present is {position}"))
            elif position == expected - 1:
                self.add(Finding(position, None, f"position {position} appears twice"))
            else:
                self.add(Finding(expected, None, f"expected position {expected}, found {position}: rows out of order"))
        elif position != expected:
            self.out_of_sequence += 1
        if digest != stored:
            self._leaf_mismatch(position)
        self.expected = max(expected, position + 1)

    # -- checkpoints

    def _signed(self, checkpoint: Checkpoint) -> bool:
        public = self.public_keys.get(checkpoint.key_id)
        if public is None:
            self.add(Finding(None, checkpoint.size, f"checkpoint of size {checkpoint.size}: unknown key id"))
            return False
        if not checkpoint.verifies(public):
            self.add(
                Finding(
                    None,
                    checkpoint.size,
                    f"checkpoint of size {checkpoint.size}: the signature does not verify "
                    "(its size, root, time or signature was changed)",
                )
            )
            return False
        return True

    def _reach(self, checkpoint: Checkpoint) -> None:
        """The leaves up to ``checkpoint.size`` have been read."""
        self.covered = max(self.covered, checkpoint.size)
        signed = self._signed(checkpoint)
        if self.broken_at is not None or self.diverged or not signed:
            return
        if self.frontier.root() == checkpoint.root:
            self.checked += 1
            self.last_verified = checkpoint.size
            for finding in self.since_checkpoint:
                finding.what += " (the body is the signed one: the stored hash was changed)"
        else:
            self.diverged = True
            for finding in self.since_checkpoint:
                finding.what += " (nor does the signed root match: the body was changed)"
            self.add(
                Finding(
                    None,
                    checkpoint.size,
                    f"the leaves do not produce the root signed at size {checkpoint.size}: "
                    f"a leaf in positions {self.last_good}–{checkpoint.size - 1} is not the signed one",
                )
            )
        self.last_good = checkpoint.size
        self.since_checkpoint = []

    def _beyond_rows(self, checkpoint: Checkpoint) -> None:
        """A checkpoint larger than the rows read: the tail was cut (or the checkpoint is forged)."""
        signed = self._signed(checkpoint)
        if signed and not self.truncation_reported:
            self.truncation_reported = True
            self.add(
                Finding(
                    self.expected,
                    checkpoint.size,
                    f"the checkpoint of size {checkpoint.size} is beyond the rows present: "
                    f"positions from {self.expected} are missing (the tail was truncated)",
                )
            )

    def report(self) -> Report:
        if self.out_of_sequence:
            self.add(Finding(None, None, f"{self.out_of_sequence} more rows out of sequence"))
        findings = sorted(self.findings, key=_order)
        if self.dropped:
            findings.append(Finding(None, None, f"{self.dropped} more findings not listed"))
        return Report(
            ok=not findings,
            size=self.count,
            first_position=self.start,
            checkpoints_checked=self.checked,
            last_verified_size=self.last_verified,
            findings=findings,
            unverified_tail=max(0, self.expected - self.covered),
        )


def _order(finding: Finding) -> tuple[int, int]:
    """Position order: a checkpoint's finding sorts after the leaves it covers (at its size - 1)."""
    if finding.position is not None:
        return (finding.position, 0)
    if finding.checkpoint_size is not None:
        return (max(finding.checkpoint_size - 1, 0), 1)
    return (2**63, 2)
