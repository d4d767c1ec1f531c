"""Run the control plane's admin API under uvicorn (``bastion.httpserver``: the edge limits) on
``control_host``:``control_port`` (or an inherited socket). Its ``/metrics`` is on this port,
which is private. Tracing is on when the ``OTEL_*`` environment asks for it (``bastion.tracing``):
admin calls (``control.gate``) and decision-log batches (``audit.consumer``) have spans."""

from __future__ import annotations

import socket

import uvicorn

from bastion import httpserver, logs, tracing
from bastion.control.app import create_app
from bastion.settings import Settings


def serve(settings: Settings, fd: int | None = None) -> None:
    logs.configure(settings.log_level, "control")
    tracing.configure("control")
    config = httpserver.config(
        create_app(settings), settings, host=settings.control_host, port=settings.control_port, fd=fd
    )
    _Server(config).run()


class _Server(uvicorn.Server):
    """uvicorn's server, which sends the spans still queued once it has shut down (uvicorn then
    raises the SIGTERM it caught again, which ends the process before any ``finally``)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        tracing.shutdown()
