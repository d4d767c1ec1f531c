"""A development certificate authority and one certificate per role, for TLS on every hop.

``init(directory)`` writes a CA (``ca.pem``, ``ca-key.pem``) and, for each role in ``ROLES``, a leaf
``<role>.pem`` / ``<role>-key.pem``: EC P-256, both server and client authentication (a gateway
serves HTTPS and is a Redis client), SANs ``DNS:<role>``, ``DNS:localhost``, ``IP:127.0.0.1`` and
every extra host given, common name the role (the admin API maps a client certificate's common name
to a principal); ``admin`` only connects, so its certificate is a client certificate only. Leaves
live ``days`` (30 by default), the CA ``CA_DAYS``. ``rotate(directory)``
reissues every leaf under the same CA, each file replaced atomically (a process reloading on SIGHUP
never reads half a file). Private keys are written 0600; nothing here reads the database, and in
production the paths come from settings (``tls_cert``, ``tls_key``, ``tls_ca``).

This is for development and tests, and for installations that want a private CA of their own;
an organisation's PKI (cert-manager, Vault) issues the same files in production.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("gateway", "worker", "control", "redis", "postgres", "admin")
# The admin (an operator's CLI) only ever connects: its certificate is a client certificate only, so
# its key cannot pose as a server. The others serve too (a worker its metrics port) and connect.
CLIENT_ONLY = frozenset({"admin"})
CA_DAYS = 365
LEAF_DAYS = 30
CA_NAME = "Bastion development CA"


@dataclass(frozen=True)
class Issued:
    """One file pair written: ``role`` ("ca" for the authority), its paths and expiry."""

    role: str
    cert: Path
    key: Path
    not_after: datetime.datetime
    sans: tuple[str, ...]


def cert_path(directory: Path, role: str) -> Path:
    return directory / ("ca.pem" if role == "ca" else f"{role}.pem")


def key_path(directory: Path, role: str) -> Path:
    return directory / ("ca-key.pem" if role == "ca" else f"{role}-key.pem")


def init(
    directory: Path,
    hosts: tuple[str, ...] = (),
    days: int = LEAF_DAYS,
    *,
    force: bool = False,
    not_before: datetime.datetime | None = None,
) -> list[Issued]:
    """A new CA and every role's leaf in ``directory``; refuses to replace an existing CA unless
    ``force`` (its leaves would stop verifying everywhere at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    if cert_path(directory, "ca").exists() and not force:
        raise FileExistsError(f"{cert_path(directory, 'ca')} exists: use rotate, or --force for a new CA")
    start = not_before or _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, start)
    _write_key(key_path(directory, "ca"), ca_key)
    _write(cert_path(directory, "ca"), ca_cert.public_bytes(serialization.Encoding.PEM))
    issued = [Issued("ca", cert_path(directory, "ca"), key_path(directory, "ca"), ca_cert.not_valid_after_utc, ())]
    return issued + [issue(directory, role, hosts, days, not_before=start) for role in ROLES]


def rotate(directory: Path, hosts: tuple[str, ...] = (), days: int = LEAF_DAYS) -> list[Issued]:
    """Every role's leaf reissued under the CA already in ``directory`` (new keys, new serials)."""
    if not cert_path(directory, "ca").exists():
        raise FileNotFoundError(f"no CA in {directory}: run `bastion certs init --dir {directory}` first")
    return [issue(directory, role, hosts, days) for role in ROLES]


def issue(
    directory: Path,
    role: str,
    hosts: tuple[str, ...] = (),
    days: int = LEAF_DAYS,
    *,
    not_before: datetime.datetime | None = None,
    name: str | None = None,
) -> Issued:
    """One leaf for ``role`` (common name ``name`` or the role) signed by the CA in ``directory``."""
    ca_key = serialization.load_pem_private_key(key_path(directory, "ca").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(cert_path(directory, "ca").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key made by bastion certs")
    start = not_before or _now()
    sans = _sans(role, hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name or role)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_uses(role)), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    stem = role if name is None else name
    cert_file, key_file = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    _write_key(key_file, key)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return Issued(stem, cert_file, key_file, cert.not_valid_after_utc, sans)


def expires_within(directory: Path, seconds: float) -> bool:
    """Whether any role certificate in ``directory`` is missing or expires within ``seconds``."""
    horizon = _now() + datetime.timedelta(seconds=seconds)
    for role in ROLES:
        try:
            cert = x509.load_pem_x509_certificate(cert_path(directory, role).read_bytes())
        except (OSError, ValueError):
            return True
        if cert.not_valid_after_utc <= horizon:
            return True
    return False


def _ca_certificate(key: ec.EllipticCurvePrivateKey, start: datetime.datetime) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf signs handshakes and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _uses(role: str) -> list[x509.ObjectIdentifier]:
    if role in CLIENT_ONLY:
        return [ExtendedKeyUsageOID.CLIENT_AUTH]
    return [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


def _sans(role: str, hosts: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for host in (role, "localhost", "127.0.0.1", *hosts):
        seen.setdefault(host.strip(), None)
    return tuple(h for h in seen if h)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` into ``path`` atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # never write into a file someone else made (or a link they planted)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(path, pem, 0o600)
