"""Lookalike letters mapped to their Latin skeleton, for screening only.

A curated subset of Unicode's ``confusables.txt`` (UTS #39, "Unicode Security Mechanisms",
https://www.unicode.org/Public/security/latest/confusables.txt): the Cyrillic, Greek, Armenian,
Cherokee and Latin-extension letters that an attacker can mix into English words without a
reader noticing. Letters that NFKC already folds (fullwidth forms, mathematical alphanumerics,
ligatures, ``ſ``) are not repeated here; the normaliser applies NFKC first.

The table is deliberately one-way (lookalike → Latin) and is only ever used to build the
*screening view* of a text: real Cyrillic or Greek prose becomes Latin gibberish in that view,
which no English rule matches, and the text the model receives is never changed by it.
"""

from __future__ import annotations

from typing import Final

# Keys are the lookalikes, values their Latin skeleton (before casefolding).
CONFUSABLES: Final[dict[str, str]] = {
    # Cyrillic capitals
    "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ј": "J", "К": "K", "М": "M",
    "О": "O", "Р": "P", "Ѕ": "S", "Т": "T", "Х": "X", "У": "Y", "Ү": "Y", "Ԁ": "D", "Ԛ": "Q",
    "Ԝ": "W", "Ӏ": "I", "Ꙅ": "S", "Ь": "b", "З": "3",
    # Cyrillic small letters
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s", "т": "t", "у": "y", "ү": "y",
    "х": "x", "ԝ": "w", "ӏ": "l", "ь": "b", "ɡ": "g", "ѵ": "v", "ꙅ": "s", "ӧ": "o", "ё": "e",
    "ї": "i", "п": "n", "г": "r",
    # Greek capitals
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "Ϲ": "C", "Ϳ": "J",
    # Greek small letters
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j", "ς": "c",
    # Armenian
    "Օ": "O", "Ս": "U", "Տ": "S", "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g", "ք": "p",
    "զ": "q", "ա": "w",
    # Cherokee capitals that look like Latin capitals
    "Ꭺ": "A", "Ᏼ": "B", "Ꮯ": "C", "Ꭰ": "D", "Ꭼ": "E", "Ꮐ": "G", "Ꮋ": "H", "Ꮖ": "I", "Ꭻ": "J",
    "Ꮶ": "K", "Ꮮ": "L", "Ꮇ": "M", "Ꮲ": "P", "Ꮪ": "S", "Ꭲ": "T", "Ꮩ": "V", "Ꮃ": "W", "Ꮓ": "Z",
    # Latin extensions and IPA letters
    "ı": "i", "ɩ": "i", "ɑ": "a", "ɒ": "a", "ʏ": "y", "ɪ": "i", "ʀ": "r", "ɴ": "n", "ʙ": "b",
    "ᴀ": "a", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ᴊ": "j", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p",
    "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z", "ɢ": "g", "ʜ": "h", "ʟ": "l", "ƽ": "s",
    "ɵ": "o", "ȷ": "j", "ℓ": "l", "ǀ": "l", "Ɩ": "l",
}  # fmt: skip
