"""Check digits of the identifiers the PII guard redacts; each function takes the bare value.

- :func:`luhn_valid`: payment cards (ISO/IEC 7812, the Luhn mod-10 check);
- :func:`iban_valid`: IBANs (ISO 13616: country length, then ISO 7064 mod 97-10 = 1);
- :func:`us_ssn_valid`: US Social Security numbers (the SSA's format rules, there is no check digit);
- :func:`uk_nino_valid`: UK National Insurance numbers (HMRC's prefix and suffix rules);
- :func:`es_dni_valid`: Spanish DNI/NIE (the control letter, mod 23);
- :func:`it_codice_fiscale_valid`: Italian codice fiscale (the check character, odd/even tables);
- :func:`nl_bsn_valid`: Dutch BSN (the "elfproef", 11-proof);
- :func:`pl_pesel_valid`: Polish PESEL (the weighted check digit and the encoded birth date).
"""

from __future__ import annotations

import re
from typing import Final

# ISO 13616 registry: IBAN length by country (SWIFT IBAN Registry).
IBAN_LENGTHS: Final[dict[str, int]] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

_NINO: Final = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\d{6}[A-D]")
_NINO_BAD_PREFIX: Final = frozenset({"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"})
_DNI_LETTERS: Final = "TRWAGMYFPDXBNJZSQVHLCKE"
_CF_ODD: Final = dict(zip("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", (
    1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10,
    22, 25, 24, 23,
), strict=True))  # fmt: skip
_CF_EVEN: Final = {c: (int(c) if c.isdigit() else ord(c) - 65) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def luhn_valid(digits: str) -> bool:
    """The Luhn mod-10 check of a card number of 13–19 digits."""
    if not (13 <= len(digits) <= 19 and digits.isdigit()):
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """ISO 13616: the country's length and the mod 97-10 check (``iban`` without spaces)."""
    iban = iban.upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit() or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def us_ssn_valid(area: str, group: str, serial: str) -> bool:
    """SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def uk_nino_valid(nino: str) -> bool:
    """HMRC format: two prefix letters (not D, F, I, Q, U, V; second not O; not BG, GB, ...), six digits, A–D."""
    nino = nino.upper()
    return _NINO.fullmatch(nino) is not None and nino[:2] not in _NINO_BAD_PREFIX


def es_dni_valid(value: str) -> bool:
    """Spanish DNI (8 digits + letter) or NIE (X/Y/Z + 7 digits + letter): the mod-23 letter."""
    value = value.upper()
    if len(value) != 9:
        return False
    body = value[:8]
    if body[0] in "XYZ":
        body = str("XYZ".index(body[0])) + body[1:]
    return body.isdigit() and _DNI_LETTERS[int(body) % 23] == value[8]


def it_codice_fiscale_valid(code: str) -> bool:
    """Italian codice fiscale (16 characters): the check character from the odd/even tables."""
    code = code.upper()
    if len(code) != 16 or not code.isalnum():
        return False
    total = sum((_CF_ODD if i % 2 == 0 else _CF_EVEN)[c] for i, c in enumerate(code[:15]))
    return chr(65 + total % 26) == code[15]


def nl_bsn_valid(digits: str) -> bool:
    """Dutch BSN (9 digits): 9·d1 + 8·d2 + … + 2·d8 − d9 ≡ 0 (mod 11), and not all zeros."""
    if len(digits) != 9 or not digits.isdigit() or digits == "000000000":
        return False
    total = sum(int(d) * w for d, w in zip(digits[:8], range(9, 1, -1), strict=True)) - int(digits[8])
    return total % 11 == 0


def pl_pesel_valid(digits: str) -> bool:
    """Polish PESEL (11 digits): the weighted check digit and a plausible encoded birth date."""
    if len(digits) != 11 or not digits.isdigit():
        return False
    weights = (1, 3, 7, 9, 1, 3, 7, 9, 1, 3)
    check = (10 - sum(int(d) * w for d, w in zip(digits[:10], weights, strict=True)) % 10) % 10
    month = int(digits[2:4]) % 20
    day = int(digits[4:6])
    return check == int(digits[10]) and 1 <= month <= 12 and 1 <= day <= 31
