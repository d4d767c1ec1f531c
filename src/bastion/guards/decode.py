"""Find embedded encoded runs and decode them, bounded, for a second screening look.

Recognised runs (each above a minimum length): base64 (standard and URL-safe alphabets, padding
optional), base32, hexadecimal (contiguous, ``\\xNN`` sequences, or space/colon-separated byte
pairs), URL percent-encoding (four or more ``%xx`` in a text: the text from the word holding the first one
is unquoted once), and ``\\uXXXX`` / ``\\xNN`` escape sequences. A run is kept
only when it decodes to valid UTF-8 that is mostly printable text with some letters: random
identifiers, hashes and binary blobs decode to junk and are dropped.

Bounded on purpose: at most ``max_runs`` runs per text, ``max_total_bytes`` decoded bytes in all,
and ``max_depth`` levels (a base64 run inside a decoded base64 run is depth 2). Nothing is logged;
the caller screens the decoded texts and keeps only counts.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

_BASE64: Final = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{16,}={0,2}")
_BASE32: Final = re.compile(r"(?<![A-Z2-7])[A-Z2-7]{16,}={0,6}(?![A-Za-z0-9])")
_HEX: Final = re.compile(r"(?<![0-9A-Za-z])(?:[0-9A-Fa-f]{2}){8,}(?![0-9A-Za-z])")
_HEX_SPACED: Final = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{2}(?:[ :,][0-9A-Fa-f]{2}){7,}(?![0-9A-Za-z])")
_HEX_PREFIXED: Final = re.compile(r"(?:(?:\\x|0x)[0-9A-Fa-f]{2}[ ,]?){8,}")
_PERCENT: Final = re.compile(r"%[0-9A-Fa-f]{2}")
_UESCAPE: Final = re.compile(r"(?:\\u[0-9A-Fa-f]{4}|\\U[0-9A-Fa-f]{8}|\\x[0-9A-Fa-f]{2}){6,}")
_ESCAPE_ITEM: Final = re.compile(r"\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})|\\x([0-9A-Fa-f]{2})")
_HEX_DIGITS: Final = re.compile(r"[0-9A-Fa-f]{2}")

KINDS: Final = ("base64", "base32", "hex", "url", "unicode_escape")


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """How far the decoder goes; the defaults suit chat messages."""

    min_chars: int = 16
    max_runs: int = 16
    max_total_bytes: int = 16_384
    max_depth: int = 2
    min_printable: float = 0.85


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded run: its encoding, its nesting depth, and the decoded text."""

    kind: str
    depth: int
    text: str


def _printable(data: bytes, limits: DecodeLimits) -> str | None:
    text = data.decode("utf-8", "replace")
    if not text:
        return None
    good = sum(1 for c in text if (c.isprintable() and c != "\ufffd") or c in "\n\r\t")
    letters = sum(1 for c in text if c.isalpha())
    if good / len(text) < limits.min_printable or letters < max(3, len(text) // 4):
        return None
    return text


def _b64(run: str) -> bytes | None:
    core = run.rstrip("=")
    if len(core) % 4 == 1:
        return None
    padded = core + "=" * (-len(core) % 4)
    try:
        if "-" in core or "_" in core:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _b32(run: str) -> bytes | None:
    core = run.rstrip("=")
    try:
        return base64.b32decode(core + "=" * (-len(core) % 8))
    except (binascii.Error, ValueError):
        return None


def _hex(run: str) -> bytes | None:
    try:
        return bytes.fromhex("".join(_HEX_DIGITS.findall(run.replace("0x", " ").replace("\\x", " "))))
    except ValueError:
        return None


def _escapes(run: str) -> bytes | None:
    out: list[str] = []
    raw = bytearray()
    for m in _ESCAPE_ITEM.finditer(run):
        if m.group(3) is not None:
            raw.append(int(m.group(3), 16))
            continue
        if raw:
            out.append(raw.decode("utf-8", "replace"))
            raw.clear()
        try:
            out.append(chr(int(m.group(1) or m.group(2), 16)))
        except (ValueError, OverflowError):
            return None
    if raw:
        out.append(raw.decode("utf-8", "replace"))
    return "".join(out).encode("utf-8", "replace")


def _token_candidates(text: str, limits: DecodeLimits, found: list[tuple[str, bytes | None]]) -> int:
    """Base64, base32 and contiguous hex in whitespace-separated tokens; returns the count of
    two-character tokens (whether spaced hex pairs are worth looking for)."""
    pairs = 0
    for token in text.split():
        if len(token) == 2:
            pairs += 1
        elif len(token) >= limits.min_chars:
            for m in _HEX.finditer(token):
                found.append(("hex", _hex(m.group())))
            for m in _BASE64.finditer(token):
                run = m.group()
                if len(run) >= limits.min_chars and not run.isdigit():
                    found.append(("base64", _b64(run)))
            for m in _BASE32.finditer(token):
                if len(m.group()) >= limits.min_chars:
                    found.append(("base32", _b32(m.group())))
    return pairs


def _candidates(text: str, limits: DecodeLimits) -> list[tuple[str, bytes | None]]:
    found: list[tuple[str, bytes | None]] = []
    if "%" in text and len(_PERCENT.findall(text, 0, limits.max_total_bytes * 3)) >= 4:
        first = _PERCENT.search(text)
        start = 0 if first is None else max(text.rfind(" ", 0, first.start()), text.rfind("\n", 0, first.start())) + 1
        found.append(("url", unquote(text[start : start + limits.max_total_bytes * 3]).encode("utf-8", "replace")))
    if "\\" in text:
        for m in _UESCAPE.finditer(text):
            found.append(("unicode_escape", _escapes(m.group())))
    if "\\x" in text or "0x" in text:
        for m in _HEX_PREFIXED.finditer(text):
            found.append(("hex", _hex(m.group())))
    pairs = _token_candidates(text, limits, found)
    if pairs >= 8:
        for m in _HEX_SPACED.finditer(text):
            found.append(("hex", _hex(m.group())))
    return found


def decode_runs(text: str, limits: DecodeLimits | None = None) -> list[Decoded]:
    """Every printable decoded run in ``text``, nested up to ``limits.max_depth``, within the caps."""
    limits = limits or DecodeLimits()
    results: list[Decoded] = []
    budget = limits.max_total_bytes
    frontier = [text]
    seen = {text}
    for depth in range(1, limits.max_depth + 1):
        next_frontier: list[str] = []
        for source in frontier:
            for kind, data in _candidates(source, limits):
                if len(results) >= limits.max_runs or budget <= 0:
                    return results
                if data is None or len(data) < 4:
                    continue
                data = data[:budget]
                budget -= len(data)
                decoded = _printable(data, limits)
                if decoded is None or decoded in seen:
                    continue
                seen.add(decoded)
                results.append(Decoded(kind=kind, depth=depth, text=decoded))
                next_frontier.append(decoded)
        frontier = next_frontier
        if not frontier:
            break
    return results
