"""Signed checkpoints of the decision log: (tree size, root hash, time) under an Ed25519 key.

The signed message is plain text, so an auditor can rebuild it with any tool::

    bastion-audit-checkpoint/v1\\n<size>\\n<root, lowercase hex>\\n<at, epoch milliseconds>\\n

A key is named by its *key id*: the hex of the first 16 bytes of SHA-256 of the raw 32-byte public
key. Private keys live in a PEM (PKCS#8) file that only the control plane reads; only Ed25519 keys
are accepted. Public keys travel as the raw 32 bytes (hex in JSON) or as PEM.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from bastion.errors import InvalidInput
from bastion.timefmt import iso_utc

MESSAGE_PREFIX = b"bastion-audit-checkpoint/v1\n"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
ROOT_SIZE = 32


def checkpoint_message(size: int, root: bytes, at_ms: int) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    return MESSAGE_PREFIX + b"%d\n%s\n%d\n" % (size, root.hex().encode(), at_ms)


def key_id(public_raw: bytes) -> str:
    """The name of a public key: hex of ``SHA-256(raw public key)[:16]`` (32 characters)."""
    return hashlib.sha256(public_raw).digest()[:16].hex()


def verify_signature(public_raw: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by ``public_raw``; never raises."""
    if len(public_raw) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def public_pem(public_raw: bytes) -> str:
    """A raw Ed25519 public key as PEM (SubjectPublicKeyInfo), for ``openssl`` and friends."""
    key = Ed25519PublicKey.from_public_bytes(public_raw)
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


class Signer:
    """An Ed25519 private key that signs checkpoints. Never logged, never serialised but to its file."""

    __slots__ = ("_key", "key_id", "public_raw")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_raw: bytes = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.key_id: str = key_id(self.public_raw)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id!r})"

    @classmethod
    def load(cls, path: Path) -> Signer:
        """The key in ``path`` (unencrypted PEM, PKCS#8); ``ValueError`` if missing or not Ed25519."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the checkpoint signing key {path}: {exc.strerror}") from None
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{path} is not an unencrypted PEM (PKCS#8) private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}; checkpoints are signed with Ed25519 only")
        return cls(key)

    @classmethod
    def create(cls, path: Path) -> Signer:
        """A new key written to ``path`` (mode 0600, parent 0700), for development.

        Refuses to overwrite: ``FileExistsError`` if the file exists (another process may have won)."""
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return cls(key)

    @property
    def public_pem(self) -> str:
        return public_pem(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self._key.sign(message)

    def checkpoint(self, size: int, root: bytes, at_ms: int) -> Checkpoint:
        """A checkpoint of ``(size, root, at_ms)`` signed by this key."""
        return Checkpoint(size, root, at_ms, self.key_id, self.sign(checkpoint_message(size, root, at_ms)))


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: the log held ``size`` leaves with root ``root`` at ``at_ms`` (epoch ms)."""

    size: int
    root: bytes
    at_ms: int
    key_id: str
    signature: bytes

    def message(self) -> bytes:
        return checkpoint_message(self.size, self.root, self.at_ms)

    def verifies(self, public_raw: bytes) -> bool:
        """Whether the signature holds under ``public_raw`` and that key is the one ``key_id`` names."""
        return key_id(public_raw) == self.key_id and verify_signature(public_raw, self.message(), self.signature)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: hashes and signature in hex; ``at`` repeats ``at_ms`` as ISO 8601 for people."""
        return {
            "size": self.size,
            "root": self.root.hex(),
            "at_ms": self.at_ms,
            "at": iso_utc(self.at_ms / 1000),
            "key_id": self.key_id,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Checkpoint:
        """Parse ``to_dict``'s form (``at`` is ignored); ``InvalidInput`` naming the bad field."""
        if not isinstance(data, dict):
            raise InvalidInput("a checkpoint is a JSON object")
        size, at_ms = _count_field(data, "size"), _count_field(data, "at_ms")
        kid = data.get("key_id")
        if not isinstance(kid, str) or not kid:
            raise InvalidInput("checkpoint field 'key_id' must be a non-empty string")
        root = _hex_field(data, "root", ROOT_SIZE)
        signature = _hex_field(data, "signature", None)
        return cls(size, root, at_ms, kid, signature)


def _count_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"checkpoint field {name!r} must be a non-negative integer")
    return value


def _hex_field(data: dict[str, Any], name: str, length: int | None) -> bytes:
    value = data.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (length is not None and len(raw) != length):
        want = f"{length} bytes" if length is not None else "bytes"
        raise InvalidInput(f"checkpoint field {name!r} must be hex of {want}")
    return raw
