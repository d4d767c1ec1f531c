"""Where a running ``bastion up`` listens, for the CLI on the same machine.

``bastion up`` writes ``<data dir>/endpoints.json`` once everything is ready (the public gateway
URL, the admin API URL and each process's metrics port) and removes it when it stops, as it does
``processes.json``. Admin commands and ``bastion doctor`` read it, so an instance started with
``--control-port 9001`` is found without repeating the flag; a host or port given to the CLI
(flag or ``BASTION_*`` variable) wins over the file. Under ``bastion up --tls`` it also names the
CA (``ca``) that the CLI verifies the admin API with. The file holds no secret.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bastion.security.tls import TLSFiles
from bastion.settings import Settings

FILE_NAME = "endpoints.json"

# Metrics ports when the setting is 0: bastion up always gives gateways and workers a private one.
DEFAULT_METRICS_PORTS = {"gateway_metrics_port": 9101, "worker_metrics_port": 9201}


def client_host(host: str) -> str:
    """How a client on this machine reaches a server bound on ``host``."""
    return "127.0.0.1" if host in {"0.0.0.0", ""} else (f"[{host}]" if ":" in host else host)  # noqa: S104


@dataclass(frozen=True)
class Endpoints:
    gateway_url: str
    control_url: str
    metrics: dict[str, int] = field(default_factory=dict)  # process name -> port; 0: metrics off
    ca: str | None = None  # the CA of bastion up --tls (its certificates' issuer), for clients

    def write(self, data_dir: Path) -> None:
        target = data_dir / FILE_NAME
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, target)  # readers never see a half-written file

    @classmethod
    def read(cls, data_dir: Path) -> Endpoints | None:
        """The running instance's endpoints, or None (not running, or an unreadable file)."""
        try:
            raw = json.loads((data_dir / FILE_NAME).read_text())
            metrics = {str(k): int(v) for k, v in dict(raw.get("metrics") or {}).items()}
            ca = raw.get("ca")
            return cls(str(raw["gateway_url"]), str(raw["control_url"]), metrics, str(ca) if ca else None)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None


def _given(settings: Settings, *fields: str) -> bool:
    return bool(set(fields) & settings.model_fields_set)


def control_url(settings: Settings) -> str:
    """The admin API: from the settings when a control host or port was given, else from the
    running instance's file, else the default host and port."""
    running = None if _given(settings, "control_host", "control_port") else Endpoints.read(settings.data_dir)
    if running is not None:
        return running.control_url
    return f"http://{client_host(settings.control_host)}:{settings.control_port}"


def gateway_url(settings: Settings) -> str:
    """The public gateway, found the same way as ``control_url``."""
    running = None if _given(settings, "host", "gateway_port") else Endpoints.read(settings.data_dir)
    if running is not None:
        return running.gateway_url
    return f"http://{client_host(settings.host)}:{settings.gateway_port}"


def client_verify(settings: Settings) -> ssl.SSLContext | bool:
    """How a client here verifies Bastion's HTTPS: ``tls_ca`` (with ``tls_cert`` as the client's
    certificate) when set, else the running ``bastion up --tls``'s CA (with its admin certificate,
    when this user may read its key), else the system's (True)."""
    if settings.tls_ca is not None:
        return TLSFiles(settings.tls_cert, settings.tls_key, settings.tls_ca).client_context()
    running = Endpoints.read(settings.data_dir)
    if running is not None and running.ca:
        ca = Path(running.ca)  # bastion up --tls: the admin certificate lies beside it (metrics ask for one)
        cert, key = ca.with_name("admin.pem"), ca.with_name("admin-key.pem")
        if cert.exists() and key.exists() and os.access(key, os.R_OK):
            return TLSFiles(cert, key, ca).client_context()
        return TLSFiles(ca=ca).client_context()
    return True
