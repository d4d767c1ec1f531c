"""Run the control plane's admin API under uvicorn (``bastion.httpserver``: the edge limits) on
``control_host``:``control_port`` (or an inherited socket). Its ``/metrics`` is on this port,
which is private. Tracing is on when the ``OTEL_*`` environment asks for it (``bastion.tracing``):
admin calls (``control.gate``) and decision-log batches (``audit.consumer``) have spans. With
``tls_cert``, HTTPS reloaded on SIGHUP; ``admin_client_certs`` asks for client certificates, whose
common names ``admin_cert_principals`` maps to principals (``control.principals``)."""

from __future__ import annotations

import socket

import uvicorn

from bastion import httpserver, logs, tracing
from bastion.control import principals
from bastion.control.app import create_app
from bastion.security import tls
from bastion.settings import Settings


def serve(settings: Settings, fd: int | None = None) -> None:
    logs.configure(settings.log_level, "control")
    tracing.configure("control")
    principals.cert_principals(settings.admin_cert_principals)  # a spec it cannot read stops the start
    listener = tls.listener(settings, settings.admin_client_certs, settings.admin_client_ca)
    config = httpserver.config(
        create_app(settings), settings, host=settings.control_host, port=settings.control_port, tls=listener
    )
    # An inherited socket is handed over as itself: uvicorn's fd= would take it for AF_UNIX, and
    # uvloop then drops the TLS handshake timeout (EdgeLoop) of a unix listener.
    _Server(config).run(sockets=None if fd is None else [socket.socket(fileno=fd)])


class _Server(uvicorn.Server):
    """uvicorn's server, which sends the spans still queued once it has shut down (uvicorn then
    raises the SIGTERM it caught again, which ends the process before any ``finally``)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        tracing.shutdown()
