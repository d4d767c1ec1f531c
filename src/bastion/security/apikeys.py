"""API keys: random, shown once, stored only as SHA-256.

A key looks like ``bst_<id>_<secret>``: the id is public (it names the key in lists and logs),
the secret is 32 random bytes. Only ``sha256(key)`` is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from bastion.constants import API_KEY_PREFIX


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    plaintext: str
    digest: str


def generate() -> NewKey:
    key_id = secrets.token_hex(6)
    plaintext = f"{API_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return NewKey(key_id, plaintext, digest(plaintext))


def digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
