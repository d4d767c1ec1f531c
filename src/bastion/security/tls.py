"""TLS for every hop: server contexts that reload on SIGHUP, client options for Redis and HTTP,
and the ``require_tls`` check that refuses a plaintext hop at start.

A process has one identity (``tls_cert``/``tls_key``, its role's certificate) and one trust
anchor (``tls_ca``). Where it listens (gateway HTTP and gRPC, admin API) that certificate is its
server certificate; where it connects (Redis, PostgreSQL) it is its client certificate, and the
peer is verified against ``tls_ca`` with its host name checked.

``ServerTLS`` holds the current ``ssl.SSLContext``. The listening socket is given a context whose
``sni_callback`` moves every new handshake onto the current one, so ``reload()`` (called on
SIGHUP) swaps in a context built from the files as they are now: connections already open keep
theirs, the next handshake gets the new certificate (and CA), and nothing is dropped. A reload
that fails (a half-written file, a key that does not match) keeps the old context and says why.
"""

from __future__ import annotations

import os
import signal
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from bastion import logs

log = logs.get("bastion.tls")

ClientCerts = Literal["off", "optional", "required"]
_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TLSConfigError(ValueError):
    """A TLS setting is missing or inconsistent; the message names the setting."""


@dataclass(frozen=True)
class TLSFiles:
    """This process's certificate, key and the CA that verifies its peers (any may be None)."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def serving(self) -> bool:
        return self.cert is not None and self.key is not None

    def redis_options(self, url: str) -> dict[str, Any]:
        """redis-py options for ``url``: for ``rediss://``, the CA (required, host name checked)
        and this process's client certificate; nothing for a plaintext URL."""
        if not url.startswith("rediss://"):
            return {}
        options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if self.ca is not None:
            options["ssl_ca_certs"] = str(self.ca)
        if self.cert is not None and self.key is not None:
            options["ssl_certfile"] = str(self.cert)
            options["ssl_keyfile"] = str(self.key)
        return options

    def client_context(self) -> ssl.SSLContext:
        """An HTTPS client context: verifies the server against the CA (or the system's), and
        presents this process's certificate when it has one (admin mTLS)."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(str(self.cert), str(self.key))
        return context


def files_of(settings: Any) -> TLSFiles:
    return TLSFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)


def server_context(files: TLSFiles, client_certs: ClientCerts = "off", alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A server context from ``files`` (TLS 1.2+); ``client_certs`` asks for (``optional``) or
    demands (``required``) a client certificate signed by ``files.ca``."""
    if files.cert is None or files.key is None:
        raise TLSConfigError("a TLS listener needs BASTION_TLS_CERT and BASTION_TLS_KEY")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))
    if client_certs != "off":
        if files.ca is None:
            raise TLSConfigError("client certificates need BASTION_TLS_CA (the CA that signs them)")
        context.load_verify_locations(cafile=str(files.ca))
    context.verify_mode = _VERIFY[client_certs]
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


class ServerTLS:
    """The listening context (``context``) of one process, reloaded from the files by ``reload``."""

    def __init__(self, files: TLSFiles, client_certs: ClientCerts = "off", alpn: tuple[str, ...] = ()) -> None:
        self.files, self.client_certs, self.alpn = files, client_certs, alpn
        self.current = server_context(files, client_certs, alpn)
        self.context = server_context(files, client_certs, alpn)  # the socket's; hands over on SNI
        self.context.sni_callback = self._hand_over
        self.reloads = 0
        self._listeners: list[Callable[[], None]] = []

    def _hand_over(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def on_reload(self, listener: Callable[[], None]) -> None:
        """``listener()`` after each successful reload (the gRPC port reads the files itself)."""
        self._listeners.append(listener)

    def reload(self) -> bool:
        """The context rebuilt from the files; False (old one kept, logged) if they do not load."""
        try:
            fresh = server_context(self.files, self.client_certs, self.alpn)
        except (OSError, ssl.SSLError, TLSConfigError) as exc:
            log.error("tls_reload_failed", error_type=type(exc).__name__, cert=str(self.files.cert))
            return False
        self.current = fresh
        self.reloads += 1
        for listener in self._listeners:
            listener()
        log.info("tls_reloaded", cert=str(self.files.cert), reloads=self.reloads)
        return True

    def reload_on_sighup(self) -> None:
        """SIGHUP reloads (from the main thread; the handler only starts a thread, never blocks)."""

        def handle(_signum: int, _frame: Any) -> None:
            threading.Thread(target=self.reload, name="tls-reload", daemon=True).start()

        signal.signal(signal.SIGHUP, handle)


def listener(settings: Any, client_certs: ClientCerts = "off", client_ca: Path | None = None) -> ServerTLS | None:
    """This process's reloading server context (SIGHUP reloads it), or None without ``tls_cert``;
    ``client_ca``: the CA of client certificates, when not ``tls_ca``."""
    files = files_of(settings)
    if not files.serving:
        return None
    if client_ca is not None:
        files = TLSFiles(files.cert, files.key, client_ca)
    server = ServerTLS(files, client_certs)
    server.reload_on_sighup()
    return server


# --- require_tls -------------------------------------------------------------------------------
Role = Literal["gateway", "worker", "control", "up"]


def plaintext_hops(settings: Any, role: Role) -> list[str]:
    """Every hop of ``role`` that would travel in clear, as a sentence naming the setting."""
    found: list[str] = []
    files = files_of(settings)
    url = settings.redis_url or ""
    if (role != "up" or url) and urlsplit(url).scheme.lower() != "rediss":  # up without a URL embeds one
        found.append(f"Redis: BASTION_REDIS_URL must be rediss:// (is {urlsplit(url).scheme or 'unset'}://)")
    weakened = {k.lower() for k in parse_qs(urlsplit(url).query)} & {"ssl_cert_reqs", "ssl_check_hostname", "ssl"}
    if weakened:
        found.append(f"Redis: BASTION_REDIS_URL must not set {', '.join(sorted(weakened))} (verification stays on)")
    if role == "up" and not settings.tls:
        found.append("bastion up: pass --tls (embedded Redis over TLS, HTTPS on the gateway and admin API)")
    if role in ("gateway", "worker", "control") and (files.cert is None or files.key is None or files.ca is None):
        found.append("certificates: BASTION_TLS_CERT, BASTION_TLS_KEY and BASTION_TLS_CA are all needed")
    if role == "control":
        found.extend(database_hops(settings.resolved_database_url))
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    exporting = os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "otlp" or endpoint
    if exporting and not _https(endpoint or "http://localhost:4318"):  # the exporter's default is plaintext
        found.append("tracing: OTEL_EXPORTER_OTLP_ENDPOINT must be https:// (the default is http://localhost:4318)")
    for name in ("oidc_issuer", "oidc_jwks_url"):
        value = getattr(settings, name, None)
        if value and not _https(str(value)):
            found.append(f"OIDC: BASTION_{name.upper()} must be https:// (keys fetched in clear could be replaced)")
    return found


def _https(url: str) -> bool:
    return urlsplit(url.strip()).scheme.lower() == "https"


def database_hops(url: str) -> list[str]:
    """SQLite is a local file (no hop); PostgreSQL must verify the server (``sslmode=verify-full``)
    and present a client certificate (``sslcert``/``sslkey``)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme.startswith("sqlite"):
        return []
    if not scheme.startswith("postgresql"):
        return [f"database: {scheme}:// is not known to be encrypted; use PostgreSQL with sslmode=verify-full"]
    query = parse_qs(urlsplit(url).query)
    found = []
    if query.get("sslmode", [""])[0] != "verify-full":
        found.append("database: BASTION_DATABASE_URL needs sslmode=verify-full")
    if not (query.get("sslcert") and query.get("sslkey") and query.get("sslrootcert")):
        found.append("database: BASTION_DATABASE_URL needs sslrootcert, sslcert and sslkey (a client certificate)")
    return found


def require(settings: Any, role: Role) -> None:
    """With ``require_tls``, refuse to start (``TLSConfigError`` listing every plaintext hop)."""
    if not settings.require_tls:
        return
    hops = plaintext_hops(settings, role)
    if hops:
        raise TLSConfigError(
            "BASTION_REQUIRE_TLS is set and these hops would be plaintext:\n  - " + "\n  - ".join(hops)
        )
