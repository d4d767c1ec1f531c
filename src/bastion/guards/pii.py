"""PII detection and redaction with typed placeholders; counts by kind, never the values.

Kinds (:class:`PiiKind`) and how each is recognised — a candidate is replaced only when its
validation passes, so ordinary numbers, wrong checksums and look-alikes stay as written:

- ``email``: ``local@domain.tld``;
- ``phone``: E.164 (``+`` and 8–15 digits, separators allowed) and common national formats that
  carry separators (North American ``(555) 123-4567``, UK ``020 7946 0958``, French
  ``01 23 45 67 89``); a bare run of digits is never a phone number;
- ``card``: 13–19 digits, optionally grouped by spaces or dashes, Luhn-valid only;
- ``iban``: ISO 13616 country length and mod-97 check;
- ``ip``: IPv4 and IPv6 addresses, validated with :mod:`ipaddress`;
- ``national_id``: US SSN (``123-45-6789`` with the SSA's rules), UK NINO (format rules), Spanish
  DNI/NIE (control letter), Italian codice fiscale (check character), and — only next to their
  name, since 9 and 11 bare digits are common — Dutch BSN (11-proof) and Polish PESEL (check digit).

Placeholders: ``[EMAIL]``, ``[PHONE]``, ``[CARD]``, ``[IBAN]``, ``[IP]``,
``[NATIONAL_ID:US_SSN]`` (``UK_NINO``, ``ES_DNI``, ``IT_CF``, ``NL_BSN``, ``PL_PESEL``).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from bastion.guards import checksums
from bastion.guards.normalize import strip_invisible
from bastion.guards.result import Decision, GuardResult

GUARD = "pii"


class PiiKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    IBAN = "iban"
    IP = "ip"
    NATIONAL_ID = "national_id"


ALL_KINDS: Final = frozenset(PiiKind)


@dataclass(frozen=True, slots=True)
class Finding:
    """Where one value sits in the text and what it is (the value itself is not kept)."""

    start: int
    end: int
    kind: PiiKind
    subtype: str = ""

    @property
    def placeholder(self) -> str:
        return f"[{self.kind.upper()}:{self.subtype}]" if self.subtype else f"[{self.kind.upper()}]"

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.subtype.lower()}" if self.subtype else str(self.kind)


_EMAIL: Final = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-])"
)
_CARD: Final = re.compile(r"(?<![\d.,-])\d(?:[ -]?\d){12,18}(?![\d]|[.,]\d)")
_IBAN: Final = re.compile(r"(?<![A-Z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,32}")
_E164: Final = re.compile(r"(?<![\w+])\+[1-9](?:[ .-]?\(?\d\)?){7,14}(?!\d)")
_NANP: Final = re.compile(r"(?<![\w+-])(?:1[ .-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-])")
_UK_PHONE: Final = re.compile(
    r"(?<![\w+-])0(?:\d{2} \d{4} \d{4}|\d{3} \d{3} \d{4}|\d{4} \d{6}|\d{4} \d{3} \d{3})(?![\w-])"
)
_FR_PHONE: Final = re.compile(r"(?<![\w+-])0[1-9](?:[ .]\d{2}){4}(?![\w-])")
_IPV4: Final = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6: Final = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])"
)
_DIGIT: Final = re.compile(r"\d")
_VERSION_BEFORE: Final = re.compile(r"(?:\bv|version|release|build)\s*$", re.IGNORECASE)
_SSN: Final = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
_NINO: Final = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-Da-d](?![A-Za-z0-9])")
_DNI: Final = re.compile(r"(?<![A-Za-z0-9])[XYZxyz]?\d{7,8}-?[A-Za-z](?![A-Za-z0-9])")
_CF: Final = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{6}[0-9LMNP-Vlmnp-v]{2}[A-EHLMPR-Ta-ehlmpr-t][0-9LMNP-Vlmnp-v]{2}[A-Za-z][0-9LMNP-Vlmnp-v]{3}[A-Za-z](?![A-Za-z0-9])"
)
_BSN: Final = re.compile(
    r"\b(?:bsn|burgerservicenummer|sofi-?nummer)\b[^\d\n]{0,20}(\d{4}\.?\d{2}\.?\d{3}|\d{9})(?!\d)", re.IGNORECASE
)
_PESEL: Final = re.compile(r"\bpesel\b[^\d\n]{0,20}(\d{11})(?!\d)", re.IGNORECASE)


def _emails(text: str) -> Iterable[Finding]:
    # Only around each "@": the pattern starts with a look-behind, which no fast scan can skip to.
    seen = -1
    at = text.find("@")
    while at != -1:
        lo = max(seen, at - 65, 0)
        for m in _EMAIL.finditer(text, lo, min(len(text), at + 260)):
            if m.start() >= seen:
                seen = m.end()
                yield Finding(m.start(), m.end(), PiiKind.EMAIL)
            break
        at = text.find("@", max(at + 1, seen))


def _cards(text: str) -> Iterable[Finding]:
    for m in _CARD.finditer(text):
        run = m.group()
        seps = {c for c in run if not c.isdigit()}
        if len(seps) <= 1 and checksums.luhn_valid(run.replace(" ", "").replace("-", "")):
            yield Finding(m.start(), m.end(), PiiKind.CARD)


def _ibans(text: str) -> Iterable[Finding]:
    for m in _IBAN.finditer(text):
        length = checksums.IBAN_LENGTHS.get(m.group()[:2])
        if length is None:
            continue
        taken = 0
        for offset, ch in enumerate(m.group()):
            if ch != " ":
                taken += 1
            if taken == length:
                end = m.start() + offset + 1
                compact = text[m.start() : end].replace(" ", "")
                nxt = text[end : end + 1]
                if checksums.iban_valid(compact) and not (nxt.isalnum() and text[end - 1] != " "):
                    yield Finding(m.start(), end, PiiKind.IBAN)
                break


def _phones(text: str) -> Iterable[Finding]:
    for m in _E164.finditer(text):
        if 8 <= sum(c.isdigit() for c in m.group()) <= 15:
            yield Finding(m.start(), m.end(), PiiKind.PHONE)
    for pattern in (_NANP, _UK_PHONE, _FR_PHONE):
        for m in pattern.finditer(text):
            yield Finding(m.start(), m.end(), PiiKind.PHONE)


def _ips(text: str) -> Iterable[Finding]:
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text, max(0, m.start() - 12), m.start()):
            continue
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield Finding(m.start(), m.end(), PiiKind.IP)
    if ":" in text:
        for m in _IPV6.finditer(text):
            candidate = m.group()
            if len(candidate) < 3 or not any(c.isalnum() for c in candidate):
                continue
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            yield Finding(m.start(), m.end(), PiiKind.IP)


def _national_ids(text: str) -> Iterable[Finding]:
    for m in _SSN.finditer(text):
        if checksums.us_ssn_valid(m.group(1), m.group(3), m.group(4)):
            yield Finding(m.start(), m.end(), PiiKind.NATIONAL_ID, "US_SSN")
    for m in _NINO.finditer(text):
        if checksums.uk_nino_valid(m.group().replace(" ", "")) and (m.group().isupper() or m.group()[:2].isupper()):
            yield Finding(m.start(), m.end(), PiiKind.NATIONAL_ID, "UK_NINO")
    for m in _DNI.finditer(text):
        if checksums.es_dni_valid(m.group().replace("-", "")):
            yield Finding(m.start(), m.end(), PiiKind.NATIONAL_ID, "ES_DNI")
    for m in _CF.finditer(text):
        if checksums.it_codice_fiscale_valid(m.group()):
            yield Finding(m.start(), m.end(), PiiKind.NATIONAL_ID, "IT_CF")
    lowered = text.lower()
    if "bsn" in lowered or "burgerservicenummer" in lowered or "sofi" in lowered or "pesel" in lowered:
        yield from _context_ids(text)


def _context_ids(text: str) -> Iterable[Finding]:
    """The ids with a check digit but no distinctive format: only right after their name."""
    for m in _BSN.finditer(text):
        if checksums.nl_bsn_valid(m.group(1).replace(".", "")):
            yield Finding(m.start(1), m.end(1), PiiKind.NATIONAL_ID, "NL_BSN")
    for m in _PESEL.finditer(text):
        if checksums.pl_pesel_valid(m.group(1)):
            yield Finding(m.start(1), m.end(1), PiiKind.NATIONAL_ID, "PL_PESEL")


# Order is priority when two findings overlap: the more specific, checksummed kinds first.
_FINDERS: Final[tuple[tuple[PiiKind, Callable[[str], Iterable[Finding]]], ...]] = (
    (PiiKind.EMAIL, _emails),
    (PiiKind.IBAN, _ibans),
    (PiiKind.CARD, _cards),
    (PiiKind.NATIONAL_ID, _national_ids),
    (PiiKind.IP, _ips),
    (PiiKind.PHONE, _phones),
)


def find_pii(text: str, kinds: Iterable[PiiKind] = ALL_KINDS) -> list[Finding]:
    """The non-overlapping findings in ``text`` of the given kinds, in text order."""
    wanted = frozenset(kinds)
    if _DIGIT.search(text) is None:  # every kind but email has digits
        wanted &= {PiiKind.EMAIL}
    taken: list[Finding] = []
    starts: list[int] = []  # of ``taken``, sorted: an overlap check is a bisection, not a scan
    ends: list[int] = []
    for kind, finder in _FINDERS:
        if kind not in wanted:
            continue
        for f in finder(text):
            i = bisect.bisect_right(starts, f.start)
            if (i and ends[i - 1] > f.start) or (i < len(starts) and starts[i] < f.end):
                continue  # overlaps a finding of a more specific kind (findings never overlap each other)
            starts.insert(i, f.start)
            ends.insert(i, f.end)
            taken.insert(i, f)
    return taken


@dataclass(frozen=True, slots=True)
class Redaction:
    """The redacted text and how many values of each kind were replaced."""

    text: str
    counts: dict[str, int]


def redact(text: str, kinds: Iterable[PiiKind] = ALL_KINDS, *, strip_hidden: bool = True) -> Redaction:
    """Replace every finding with its typed placeholder.

    With ``strip_hidden`` (the default) zero-width, bidi and tag characters are removed first, so
    that ``a\u200b@example.com`` cannot hide an address; the returned text is then that stripped text.
    """
    if strip_hidden and not text.isascii():
        text = strip_invisible(text)[0]
    findings = find_pii(text, kinds)
    counts: dict[str, int] = {}
    parts: list[str] = []
    last = 0
    for f in findings:
        parts.append(text[last : f.start])
        parts.append(f.placeholder)
        last = f.end
        counts[f.label] = counts.get(f.label, 0) + 1
    parts.append(text[last:])
    return Redaction("".join(parts), counts)


class PiiMode(StrEnum):
    OFF = "off"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class PiiSettings:
    """What the PII guard does with what it finds, and which kinds it looks for."""

    mode: PiiMode = PiiMode.REDACT
    kinds: frozenset[PiiKind] = ALL_KINDS


def guard_pii(text: str, settings: PiiSettings) -> tuple[str, GuardResult]:
    """Apply the PII guard: the text to pass on (redacted under ``redact``) and the decision."""
    started = time.perf_counter_ns()
    if settings.mode is PiiMode.OFF:
        return text, GuardResult(GUARD, Decision.ALLOW, 0)
    redaction = redact(text, settings.kinds)
    found = bool(redaction.counts)
    decision = (
        {
            PiiMode.FLAG: Decision.FLAG,
            PiiMode.REDACT: Decision.REDACT,
            PiiMode.BLOCK: Decision.BLOCK,
        }[settings.mode]
        if found
        else Decision.ALLOW
    )
    out = redaction.text if settings.mode is PiiMode.REDACT else text
    kinds = tuple(dict.fromkeys(k.split(":")[0] for k in redaction.counts))
    return out, GuardResult(
        guard=GUARD,
        decision=decision,
        latency_us=(time.perf_counter_ns() - started) // 1000,
        counts=redaction.counts,
        categories=kinds,
        reason=f"found {', '.join(sorted(redaction.counts))}" if found else None,
    )
