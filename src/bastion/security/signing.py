"""Ed25519 signatures over artifacts: a publisher signs the artifact's sha256, Bastion verifies.

The signed message is the artifact's raw 32-byte SHA-256 digest. Public keys are accepted as
PEM (``-----BEGIN PUBLIC KEY-----``) or as the base64 of the raw 32 bytes; signatures as base64
of the raw 64 bytes. Private keys never reach Bastion.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from bastion.errors import InvalidArtifact, InvalidInput


def load_public_key(text: str) -> Ed25519PublicKey:
    """Parse a public key or raise ``InvalidInput`` saying why."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError) as exc:
        raise InvalidInput("the signing key is not an Ed25519 public key (PEM or base64 of 32 bytes)") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInput("the signing key must be an Ed25519 public key")
    return key


def normalise_public_key(text: str) -> str:
    """The key as base64 of its raw 32 bytes (how it is stored)."""
    raw = load_public_key(text).public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def verify(public_key: str, signature_b64: str, sha256_hex: str) -> None:
    """Raise ``InvalidArtifact`` unless ``signature_b64`` signs the digest ``sha256_hex``."""
    try:
        signature = base64.b64decode(signature_b64.strip(), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidArtifact("the artifact signature is not base64") from exc
    try:
        load_public_key(public_key).verify(signature, bytes.fromhex(sha256_hex))
    except InvalidSignature as exc:
        raise InvalidArtifact("the artifact signature does not verify against the signer's public key") from exc
