"""Keys of the decision log: the key-encryption key (KEK) seam, AES-256-GCM sealing, and the
keyring of tenant secrets and data keys in SQL (crypto-shredding destroys the latter).

Two layers. A **data key** (32 random bytes, one per tenant, subject pseudonym and UTC day)
encrypts payloads with AES-256-GCM, the event id as associated data (so a ciphertext moved to
another event does not open). Data keys and tenant secrets are stored only **wrapped** by the
KEK, through the ``KeyProvider`` seam: ``wrap``/``unwrap`` with a context (the row the key
belongs to, bound as associated data, so a wrapped key copied to another row does not open) and
the id of the KEK that wrapped it. The KEK itself never reaches the database.

``LocalKeyProvider`` holds the KEK in memory, from ``BASTION_AUDIT_KEK`` or the KEK file (32 bytes,
base64). Several keys may be given (comma-separated in the variable, one a line in the file):
the first wraps, every one unwraps - rotate by putting the new key first and re-wrapping
(``AuditLog.rewrap``), then drop the old one. A KMS or Vault transit backend is another
``KeyProvider``; nothing else changes.

``Keyring`` keeps the wrapped keys in SQL: a tenant's pseudonym secret (32 random bytes, created
on first need) keys ``HMAC-SHA256(secret, subject digest)``; data keys are created in the
appending transaction and destroyed by erasure and retention (``destroy``), after which
``scrub`` removes the deleted bytes from the database files: SQLite overwrites deleted content
(``secure_delete``) and truncates its write-ahead log; PostgreSQL rewrites the keys table
(``VACUUM FULL``; a plain delete only marks the row dead, and its bytes stay in the table's pages
until the page is reused). Neither reaches copies made before (backups, a PostgreSQL WAL archive,
free blocks of the file system): a wrapped key there is useless without the KEK, which is why the
KEK never lives in the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Engine, delete, select, text, tuple_
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session

from bastion import logs
from bastion.audit.tables import AuditDataKey, AuditTenantSecret
from bastion.errors import Unavailable
from bastion.registry.db import Sessions
from bastion.settings import Settings

log = logs.get("bastion.audit.crypto")

KEY_BYTES = 32
NONCE_BYTES = 12
_WRAP_AAD = b"bastion-audit-wrap/v1\x00"


class Undecryptable(Exception):
    """A ciphertext or wrapped key did not open: wrong key, wrong context, or edited bytes."""


class KeyProvider(Protocol):
    """Wraps and unwraps data keys and tenant secrets under a key-encryption key."""

    @property
    def key_id(self) -> str:
        """The id of the KEK that ``wrap`` uses now."""
        ...

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` wrapped under the current KEK, bound to ``context``."""
        ...

    def unwrap(self, wrapped: bytes, kek_id: str, context: bytes) -> bytes:
        """The key ``wrap`` was given; ``Undecryptable`` when it does not open (an unknown
        ``kek_id``, another context, edited bytes)."""
        ...


def kek_id_of(kek: bytes) -> str:
    return hashlib.sha256(b"bastion-audit-kek-id\x00" + kek).hexdigest()[:16]


class LocalKeyProvider:
    """KEKs held in this process; the first wraps, all unwrap (AES-256-GCM)."""

    def __init__(self, keks: list[bytes]) -> None:
        if not keks or any(len(k) != KEY_BYTES for k in keks):
            raise ValueError(f"a key-encryption key is {KEY_BYTES} bytes")
        self._keks = {kek_id_of(k): AESGCM(k) for k in keks}
        self._current = kek_id_of(keks[0])

    @property
    def key_id(self) -> str:
        return self._current

    def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._keks[self._current].encrypt(nonce, key, _WRAP_AAD + context)

    def unwrap(self, wrapped: bytes, kek_id: str, context: bytes) -> bytes:
        aead = self._keks.get(kek_id)
        if aead is None:
            raise Undecryptable(f"no key-encryption key with id {kek_id}")
        try:
            return aead.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _WRAP_AAD + context)
        except InvalidTag:
            raise Undecryptable("a wrapped key did not open") from None


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> tuple[bytes, bytes]:
    """``(nonce, ciphertext)`` of ``plaintext`` under ``key`` (AES-256-GCM), bound to ``associated``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, nonce: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated)
    except InvalidTag:
        raise Undecryptable("a payload did not open") from None


def _parse_keks(text: str, where: str) -> list[bytes]:
    keks = []
    for part in text.replace(",", "\n").split():
        try:
            raw = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{where}: a key-encryption key is not valid base64") from None
        if len(raw) != KEY_BYTES:
            raise ValueError(f"{where}: a key-encryption key must be {KEY_BYTES} bytes, base64 (got {len(raw)})")
        keks.append(raw)
    if not keks:
        raise ValueError(f"{where} holds no key-encryption key")
    return keks


def _create_kek_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(new_key()).decode() + "\n")
    log.warning("audit_kek_created", path=str(path), hint="development only: back it up, or payloads are lost")


def provider_from(settings: Settings) -> KeyProvider:
    """The KEK provider the settings name: ``audit_kek`` (the variable), else the KEK file. In
    development a missing file is created (0600, in the data directory; never in the database);
    in production a missing KEK refuses to start."""
    if settings.audit_kek is not None:
        return LocalKeyProvider(_parse_keks(settings.audit_kek.get_secret_value(), "BASTION_AUDIT_KEK"))
    path = settings.resolved_audit_kek_file
    if not path.exists():
        if settings.environment == "production":
            raise ValueError(
                "the decision log needs a key-encryption key in production: set BASTION_AUDIT_KEK (32 bytes, "
                f"base64) or BASTION_AUDIT_KEK_FILE (no file at {path})"
            )
        try:
            _create_kek_file(path)
        except FileExistsError:  # another process made it first
            pass
    try:
        text = path.read_text()
    except OSError as exc:
        raise Unavailable(f"the key-encryption key file {path} cannot be read: {exc.strerror}") from None
    if path.stat().st_mode & 0o077:
        log.warning("audit_kek_file_readable", path=str(path), hint="chmod 600: only the control plane may read it")
    return LocalKeyProvider(_parse_keks(text, str(path)))


def subject_digest(tenant: str, subject: str) -> str:
    """The digest the gateway puts in a job's envelope for a named subject (``subj``):
    ``blake2b(tenant NUL subject, 16 bytes)`` as hex - the same rule, copied, not imported."""
    return hashlib.blake2b(f"{tenant}\x00{subject}".encode(), digest_size=16).hexdigest()


def key_subject(key_id: str) -> str:
    """The subject of a caller that names none: its own key (as the gateway's routing does)."""
    return f"key:{key_id}"


SubjectDay = tuple[str, str, int]  # tenant, pseudonym, UTC day
_PSEUDONYMS_KEPT = 100_000  # pseudonyms remembered per process (then forgotten all at once)


def _secret_context(tenant: str) -> bytes:
    return b"tenant-secret\x00" + tenant.encode()


def _data_key_context(tenant: str, pseudonym: str, day: int) -> bytes:
    return b"data-key\x00%s\x00%s\x00%d" % (tenant.encode(), pseudonym.encode(), day)


class Keyring:
    """Tenant secrets and data keys, stored wrapped by ``provider``; unwrapped secrets are cached
    in this process (a secret never changes), and so are recent pseudonyms; data keys never are
    (another replica may destroy one at any time)."""

    def __init__(self, sessions: Sessions, provider: KeyProvider) -> None:
        self.sessions = sessions
        self.provider = provider
        self._secrets: dict[str, bytes] = {}
        self._pseudonyms: dict[tuple[str, str], str] = {}  # a secret never changes, so neither do these

    # tenant secrets and pseudonyms -------------------------------------------------------
    def tenant_secret(self, tenant: str, *, create: bool = True) -> bytes | None:
        """The tenant's pseudonym secret, created (32 random bytes, wrapped) when it has none yet
        and ``create``; None when it has none and not ``create``. Inside a unit of work it joins
        the unit's transaction."""
        found = self._secrets.get(tenant)
        if found is not None:
            return found
        with self.sessions.begin() as s:
            row = s.get(AuditTenantSecret, tenant)
            if row is None:
                if not create:
                    return None
                wrapped = self.provider.wrap(new_key(), _secret_context(tenant))
                row = AuditTenantSecret(tenant=tenant, wrapped=wrapped, kek_id=self.provider.key_id)
                try:
                    with s.begin_nested():
                        s.add(row)
                except SqlIntegrityError:  # another process created it first: use that one
                    found_row = s.get(AuditTenantSecret, tenant, populate_existing=True)
                    if found_row is None:
                        raise
                    row = found_row
            secret = self._open(row.wrapped, row.kek_id, _secret_context(tenant), "a tenant secret")
        self._secrets[tenant] = secret
        return secret

    def pseudonym(self, tenant: str, digest: str, *, create: bool = True) -> str | None:
        """``HMAC-SHA256(tenant secret, digest)`` as hex; None for an empty digest, or when the
        tenant has no secret and not ``create`` (then it has no events about anyone)."""
        if not digest:
            return None
        found = self._pseudonyms.get((tenant, digest))
        if found is not None:
            return found
        secret = self.tenant_secret(tenant, create=create)
        if secret is None:
            return None
        found = hmac.new(secret, digest.encode(), hashlib.sha256).hexdigest()
        if len(self._pseudonyms) >= _PSEUDONYMS_KEPT:
            self._pseudonyms.clear()
        self._pseudonyms[(tenant, digest)] = found
        return found

    def subject_pseudonym(self, tenant: str, subject: str, *, create: bool = False) -> str | None:
        return self.pseudonym(tenant, subject_digest(tenant, subject), create=create)

    # data keys ---------------------------------------------------------------------------
    def data_keys(self, s: Session, wanted: Iterable[SubjectDay]) -> dict[SubjectDay, tuple[int, bytes]]:
        """The data key (row id, key) of each (tenant, pseudonym, day) in ``wanted``, created in
        ``s``'s transaction where missing. Call it under the append lock (``audit_head``): no
        other appender creates the same key meanwhile."""
        wanted = set(wanted)
        found: dict[SubjectDay, tuple[int, bytes]] = {}
        listed = sorted(wanted)
        for i in range(0, len(listed), 500):
            chunk = listed[i : i + 500]
            rows = s.scalars(
                select(AuditDataKey).where(
                    tuple_(AuditDataKey.tenant, AuditDataKey.pseudonym, AuditDataKey.day).in_(chunk)
                )
            )
            for row in rows:
                sd = (row.tenant, row.pseudonym, row.day)
                found[sd] = (row.id, self._open(row.wrapped, row.kek_id, _data_key_context(*sd), "a data key"))
        made = []
        for sd in sorted(wanted - found.keys()):
            key = new_key()
            row = AuditDataKey(
                tenant=sd[0],
                pseudonym=sd[1],
                day=sd[2],
                wrapped=self.provider.wrap(key, _data_key_context(*sd)),
                kek_id=self.provider.key_id,
            )
            made.append((sd, row, key))
        if made:
            s.add_all([row for _, row, _ in made])
            s.flush()  # one batch: the new rows get their ids
            for sd, row, key in made:
                found[sd] = (row.id, key)
        return found

    def data_key(self, s: Session, key_id: int) -> bytes | None:
        """The data key with row id ``key_id``; None once it was destroyed."""
        row = s.get(AuditDataKey, key_id)
        if row is None:
            return None
        return self._open(row.wrapped, row.kek_id, _data_key_context(row.tenant, row.pseudonym, row.day), "a data key")

    def destroy(self, s: Session, tenant: str, *, pseudonym: str | None = None, before_day: int | None = None) -> int:
        """Delete the tenant's data keys - of one pseudonym, or of days before ``before_day``, or
        all - in ``s``'s transaction (on SQLite with ``secure_delete``: the freed bytes are
        zeroed). Call ``scrub`` after the commit. How many were destroyed."""
        if s.get_bind().dialect.name == "sqlite":
            s.execute(text("PRAGMA secure_delete=ON"))
        query = delete(AuditDataKey).where(AuditDataKey.tenant == tenant)
        if pseudonym is not None:
            query = query.where(AuditDataKey.pseudonym == pseudonym)
        if before_day is not None:
            query = query.where(AuditDataKey.day < before_day)
        done = s.execute(query.execution_options(synchronize_session=False))
        return int(getattr(done, "rowcount", 0) or 0)

    def rewrap(self) -> int:
        """Wrap every tenant secret and data key not wrapped by the current KEK again under it
        (KEK rotation: payloads are not re-encrypted). How many were re-wrapped."""
        current, done = self.provider.key_id, 0
        with self.sessions.begin() as s:
            for secret in s.scalars(select(AuditTenantSecret).where(AuditTenantSecret.kek_id != current)):
                context = _secret_context(secret.tenant)
                key = self._open(secret.wrapped, secret.kek_id, context, "a tenant secret")
                secret.wrapped, secret.kek_id = self.provider.wrap(key, context), current
                done += 1
            for row in s.scalars(select(AuditDataKey).where(AuditDataKey.kek_id != current)):
                context = _data_key_context(row.tenant, row.pseudonym, row.day)
                key = self._open(row.wrapped, row.kek_id, context, "a data key")
                row.wrapped, row.kek_id = self.provider.wrap(key, context), current
                done += 1
        if done:
            log.info("audit_keys_rewrapped", count=done, kek_id=current)
        return done

    def _open(self, wrapped: bytes, kek_id: str, context: bytes, what: str) -> bytes:
        try:
            return self.provider.unwrap(wrapped, kek_id, context)
        except Undecryptable:
            raise Unavailable(
                f"{what} of the decision log does not open with the configured key-encryption keys (it was wrapped "
                f"by key {kek_id}): configure that key (BASTION_AUDIT_KEK / BASTION_AUDIT_KEK_FILE)"
            ) from None


def scrub(engine: Engine) -> None:
    """After keys were deleted and committed, remove their bytes from the database files:
    SQLite truncates its write-ahead log (older frames may still hold the deleted page; the
    deleting transaction zeroed it in the new one); PostgreSQL rewrites ``audit_data_keys``
    with ``VACUUM FULL`` - outside any transaction (VACUUM refuses to run in one), so on an
    autocommit connection of its own. Best effort: a failure is logged, never raised (the keys
    are deleted either way; only the dead bytes may linger until the space is reused)."""
    try:
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        elif engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM FULL audit_data_keys")
    except Exception as exc:  # the deletion stands; report and go on
        log.warning("audit_scrub_failed", error_type=type(exc).__name__)
