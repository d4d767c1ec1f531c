"""Unicode normalisation for screening: one *view* of a text that rules can match.

The view is never shown to the model; it only exists so that ``Ignore`` written with Cyrillic
letters, fullwidth forms, zero-width joiners between the letters, bidi overrides or hidden in the
Unicode tag block reads, to a rule, as ``ignore``. Steps, in order:

1. NFKC (fullwidth and mathematical letters, ligatures, compatibility forms → plain letters);
2. strip invisible characters, counted by kind: zero-width and format characters (U+200B–U+200D,
   U+2060–U+2064, U+FEFF, soft hyphen, ...), bidi controls (U+202A–U+202E, U+2066–U+2069,
   U+200E/F, U+061C; a run under a right-to-left override U+202E is reversed back into the
   order a reader sees), variation selectors, other control characters, and the tag block
   U+E0000–U+E007F, whose characters U+E0020–U+E007E are decoded to their ASCII meaning
   ("ASCII smuggling") and returned apart for a second look;
3. map confusables to Latin (``bastion.guards.confusables``), drop combining marks, casefold;
4. collapse runs of horizontal whitespace to one space and of blank lines to one newline.

``leet`` is a second view with a light leetspeak mapping (``1gn0r3`` → ``ignore``), for rule
matching only. Nothing here logs or keeps the text: the result carries the views and counts.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from bastion.guards.confusables import CONFUSABLES

_ZERO_WIDTH: Final = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200d\u2060-\u2064\u206a-\u206f"
    "\u3164\ufeff\uffa0\U0001d173-\U0001d17a]"
)
_BIDI: Final = re.compile("[\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# A right-to-left override shows its run reversed: the view reverses it back (display order).
_RLO_RUN: Final = re.compile("\u202e([^\u202a-\u202e\u2066-\u2069]*)(?:\u202c|\u2069|$)")
_VARIATION: Final = re.compile("[\ufe00-\ufe0f\U000e0100-\U000e01ef]")
_CONTROL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_TAGS: Final = re.compile("[\U000e0000-\U000e007f]+")
_COMBINING: Final = re.compile("[\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]+")
_CONFUSABLE: Final = re.compile("[" + "".join(sorted(CONFUSABLES)) + "]")
_HSPACE: Final = re.compile(r"[^\S\n]+")
_VSPACE: Final = re.compile(r"\n\s+")
_ODD_SPACE: Final = ("  ", "\t", "\r", "\x0b", "\x0c")
_LEET: Final = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_CHARS: Final = re.compile(r"[013457@$]")

#: Kinds counted in :attr:`Normalized.stripped`.
STRIP_KINDS: Final = ("zero_width", "bidi", "variation_selector", "control", "tag", "confusable", "combining")


@dataclass(frozen=True, slots=True)
class Normalized:
    """The screening views of one text and what was removed or mapped to get them."""

    text: str
    """Casefolded, confusable-mapped, invisible-free, whitespace-collapsed view."""
    clean: str
    """NFKC with invisible characters removed but case and letters kept (what decoders read)."""
    smuggled: str
    """ASCII decoded from Unicode tag characters, normalised like ``text`` ("" if none)."""
    leet: str
    """``text`` with the light leetspeak mapping applied (equal to ``text`` when nothing mapped)."""
    stripped: MappingProxyType[str, int] = field(default_factory=lambda: MappingProxyType({}))
    """Counts by kind (see :data:`STRIP_KINDS`); kinds with a zero count are left out."""


def strip_invisible(text: str) -> tuple[str, dict[str, int], str]:
    """Remove invisible characters; return the text, counts by kind and the tag-decoded ASCII."""
    counts: dict[str, int] = {}
    smuggled: list[str] = []
    if text.isascii():
        stripped, n = _CONTROL.subn("", text)
        if n:
            counts["control"] = n
        return stripped, counts, ""

    def _untag(match: re.Match[str]) -> str:
        run = match.group()
        counts["tag"] = counts.get("tag", 0) + len(run)
        smuggled.append("".join(chr(ord(c) - 0xE0000) for c in run if 0xE0020 <= ord(c) <= 0xE007E))
        return ""

    text = _TAGS.sub(_untag, text)
    if "\u202e" in text:
        text, n = _RLO_RUN.subn(lambda m: m.group(1)[::-1], text)
        counts["bidi"] = 2 * n
    for kind, pattern in (("zero_width", _ZERO_WIDTH), ("bidi", _BIDI), ("variation_selector", _VARIATION)):
        text, n = pattern.subn("", text)
        if n:
            counts[kind] = counts.get(kind, 0) + n
    text, n = _CONTROL.subn("", text)
    if n:
        counts["control"] = n
    return text, counts, " ".join(s for s in smuggled if s)


def skeleton(text: str, counts: dict[str, int] | None = None) -> str:
    """Map confusables to Latin, drop combining marks, casefold and collapse whitespace."""
    if not text.isascii():
        n_conf = 0

        def _map(match: re.Match[str]) -> str:
            nonlocal n_conf
            n_conf += 1
            return CONFUSABLES[match.group()]

        text = _CONFUSABLE.sub(_map, text)
        text = unicodedata.normalize("NFKD", text)
        text, n_comb = _COMBINING.subn("", text)
        if counts is not None:
            if n_conf:
                counts["confusable"] = counts.get("confusable", 0) + n_conf
            if n_comb:
                counts["combining"] = counts.get("combining", 0) + n_comb
    text = text.casefold()
    if not text.isascii() or any(s in text for s in _ODD_SPACE):
        text = _HSPACE.sub(" ", text)
    if "\n" in text:
        text = _VSPACE.sub("\n", text.replace(" \n", "\n"))
    return text.strip()


def leetspeak(view: str) -> str:
    """The light leetspeak mapping of an already normalised view (``1gn0r3`` → ``ignore``)."""
    if _LEET_CHARS.search(view) is None:
        return view
    return view.translate(_LEET)


def normalize(text: str) -> Normalized:
    """Build the screening views of ``text`` (see the module docstring for the steps)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    clean, counts, smuggled = strip_invisible(text)
    view = skeleton(clean, counts)
    smuggled_view = skeleton(unicodedata.normalize("NFKC", smuggled)) if smuggled else ""
    return Normalized(
        text=view,
        clean=clean,
        smuggled=smuggled_view,
        leet=leetspeak(view),
        stripped=MappingProxyType(counts),
    )
