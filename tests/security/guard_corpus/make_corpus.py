"""Builds the guard corpus (``attacks.jsonl``, ``benign.jsonl``) from the hand-written base files.

Run ``python tests/security/guard_corpus/make_corpus.py`` after editing a base file; the test checks
that the committed JSON-lines files are what this script writes (it is deterministic: every
random choice comes from a seeded ``random.Random``).

Splits:

- ``dev``: the hand-written texts as written, and one variant per obfuscation kind drawn with
  seed 1 — the rules were tuned while looking at these;
- ``heldout``: variants drawn with seed 2 (other positions, other lookalikes, other wrappers) plus
  two-kind combinations, and the held-out base files (``*_heldout.txt``, written after the
  rules were frozen) — the rules were not changed after measuring these.

Obfuscation kinds: ``zero_width``, ``bidi`` (marks inside words, or a word stored reversed under a
right-to-left override), ``tag`` (the attack hidden in the Unicode tag block behind a harmless
visible sentence), ``confusable`` (Cyrillic/Greek lookalikes), ``fullwidth`` (NFKC forms;
held-out also mathematical bold letters), ``base64``, ``hex``, ``url``, ``unicode_escape``,
``case_leet``, ``split_lines``.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent

_ZW = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")
_BIDI_MARKS = ("\u200e", "\u200f", "\u202a", "\u202c", "\u2066", "\u2069", "\u061c")
_LOOKALIKE = {
    "a": "аα", "c": "сϲ", "e": "еε", "i": "іι", "j": "ј", "o": "оοօ", "p": "рρ", "s": "ѕ", "x": "хχ",
    "y": "уү", "h": "һ", "k": "κ", "v": "ν", "w": "ԝ", "A": "АΑ", "B": "ВΒ", "C": "С", "E": "ЕΕ",
    "H": "НΗ", "I": "ІΙ", "K": "КΚ", "M": "МΜ", "O": "ОΟ", "P": "РΡ", "T": "ТΤ", "X": "ХΧ", "Y": "Υ",
}  # fmt: skip
_LEET = {"a": "4@", "e": "3", "i": "1", "o": "0", "s": "5$", "t": "7"}
_COVERS = (
    "Please summarize this article for me.",
    "What a lovely day it is.",
    "Can you check my grammar?",
    "Thanks for the help earlier!",
)
_WRAPPERS = ("Here is some data: {}", "Process this input: {}", "{}", "Input: {} thanks", "Payload {} end")


def zero_width(text: str, rng: random.Random) -> str:
    return "".join(c + rng.choice(_ZW) if c.isalpha() and rng.random() < 0.35 else c for c in text)


def bidi(text: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(c + rng.choice(_BIDI_MARKS) if c.isalpha() and rng.random() < 0.3 else c for c in text)
    words = text.split(" ")
    start = rng.randrange(len(words))
    end = min(len(words), start + rng.randint(2, 6))
    hidden = " ".join(words[start:end])
    return " ".join([*words[:start], "\u202e" + hidden[::-1] + "\u202c", *words[end:]])


def tag(text: str, rng: random.Random) -> str:
    hidden = "".join(chr(0xE0000 + ord(c)) for c in text if 0x20 <= ord(c) <= 0x7E)
    return rng.choice(_COVERS) + " " + hidden


def confusable(text: str, rng: random.Random) -> str:
    return "".join(rng.choice(_LOOKALIKE[c]) if c in _LOOKALIKE and rng.random() < 0.5 else c for c in text)


def fullwidth(text: str, rng: random.Random) -> str:
    if rng.random() < 0.3:  # mathematical bold letters, also folded by NFKC
        return "".join(
            chr(0x1D400 + ord(c) - 65) if "A" <= c <= "Z" else chr(0x1D41A + ord(c) - 97) if "a" <= c <= "z" else c
            for c in text
        )
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else "\u3000" if c == " " else c for c in text)


def b64(text: str, rng: random.Random) -> str:
    encoded = base64.b64encode(text.encode()).decode()
    if rng.random() < 0.3:
        encoded = base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")
    return rng.choice(_WRAPPERS).format(encoded)


def hexed(text: str, rng: random.Random) -> str:
    data = text.encode()
    style = rng.randrange(3)
    encoded = (
        data.hex()
        if style == 0
        else " ".join(f"{b:02x}" for b in data)
        if style == 1
        else "".join(f"\\x{b:02x}" for b in data)
    )
    return rng.choice(_WRAPPERS).format(encoded)


def url(text: str, rng: random.Random) -> str:
    encoded = "".join(
        f"%{b:02X}" if not (b < 0x80 and chr(b).isalnum()) or rng.random() < 0.5 else chr(b) for b in text.encode()
    )
    return rng.choice(_WRAPPERS).format(encoded)


def unicode_escape(text: str, rng: random.Random) -> str:
    return rng.choice(_WRAPPERS).format("".join(f"\\u{ord(c):04x}" for c in text))


def case_leet(text: str, rng: random.Random) -> str:
    out = []
    for c in text:
        low = c.lower()
        if low in _LEET and rng.random() < 0.5:
            out.append(rng.choice(_LEET[low]))
        else:
            out.append(c.upper() if rng.random() < 0.5 else c.lower())
    return "".join(out)


def split_lines(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    out = [words[0]]
    for w in words[1:]:
        out.append(("\n" if rng.random() < 0.6 else " ") + w)
    return "".join(out)


OBFUSCATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "zero_width": zero_width,
    "bidi": bidi,
    "tag": tag,
    "confusable": confusable,
    "fullwidth": fullwidth,
    "base64": b64,
    "hex": hexed,
    "url": url,
    "unicode_escape": unicode_escape,
    "case_leet": case_leet,
    "split_lines": split_lines,
}
# Combinations that compose (the outer one applied last).
_COMBOS = (("confusable", "zero_width"), ("case_leet", "split_lines"), ("confusable", "base64"), ("fullwidth", "bidi"))


def read_base(name: str) -> list[tuple[str, str]]:
    path = HERE / name
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, text = line.split("\t", 1)
            rows.append((label, text.replace("\\n", "\n")))
    return rows


def _variants(prefix: str, base: list[tuple[str, str]], seed: int, split: str, combos: bool) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    for n, (label, text) in enumerate(base):
        for kind, fn in OBFUSCATIONS.items():
            rows.append(
                {
                    "id": f"{prefix}{n:03d}-{kind}-s{seed}",
                    "label": label,
                    "text": fn(text, rng),
                    "obfuscation": [kind],
                    "split": split,
                }
            )
        if combos:
            inner, outer = _COMBOS[n % len(_COMBOS)]
            mixed = OBFUSCATIONS[outer](OBFUSCATIONS[inner](text, rng), rng)
            rows.append(
                {
                    "id": f"{prefix}{n:03d}-{inner}+{outer}-s{seed}",
                    "label": label,
                    "text": mixed,
                    "obfuscation": [inner, outer],
                    "split": split,
                }
            )
    return rows


def build() -> dict[str, list[dict[str, object]]]:
    """The rows of ``attacks.jsonl`` and ``benign.jsonl``."""
    attacks = read_base("attacks_base.txt")
    held_attacks = read_base("attacks_heldout.txt")
    benign = read_base("benign_base.txt")
    held_benign = read_base("benign_heldout.txt")
    attack_rows: list[dict[str, object]] = [
        {"id": f"a{n:03d}", "label": c, "text": t, "obfuscation": [], "split": "dev"}
        for n, (c, t) in enumerate(attacks)
    ]
    attack_rows += _variants("a", attacks, 1, "dev", combos=False)
    attack_rows += _variants("a", attacks, 2, "heldout", combos=True)
    attack_rows += [
        {"id": f"h{n:03d}", "label": c, "text": t, "obfuscation": [], "split": "heldout"}
        for n, (c, t) in enumerate(held_attacks)
    ]
    attack_rows += _variants("h", held_attacks, 3, "heldout", combos=True)
    benign_rows: list[dict[str, object]] = [
        {"id": f"b{n:03d}", "label": c, "text": t, "obfuscation": [], "split": "dev"} for n, (c, t) in enumerate(benign)
    ]
    # Benign texts obfuscated the same ways must stay benign (a screen must not fire on encoding alone).
    # Not "tag": any hidden tag-block message is itself reported (INJ-SMUG-1), whatever it says.
    kinds = [k for k in OBFUSCATIONS if k != "tag"]
    rng = random.Random(4)
    for n, (label, text) in enumerate(benign):
        kind = kinds[n % len(kinds)]
        benign_rows.append(
            {
                "id": f"b{n:03d}-{kind}",
                "label": label,
                "text": OBFUSCATIONS[kind](text, rng),
                "obfuscation": [kind],
                "split": "dev",
            }
        )
    benign_rows += [
        {"id": f"g{n:03d}", "label": c, "text": t, "obfuscation": [], "split": "heldout"}
        for n, (c, t) in enumerate(held_benign)
    ]
    return {"attacks.jsonl": _unique(attack_rows), "benign.jsonl": _unique(benign_rows)}


def _unique(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Rows with distinct texts (a deterministic obfuscation can repeat across seeds): the first kept."""
    seen: set[object] = set()
    out = []
    for row in rows:
        if row["text"] not in seen:
            seen.add(row["text"])
            out.append(row)
    return out


def render(rows: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows)


if __name__ == "__main__":
    for name, rows in build().items():
        (HERE / name).write_text(render(rows), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")
