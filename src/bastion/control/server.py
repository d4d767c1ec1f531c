"""Run the control plane's admin API under uvicorn (``bastion.httpserver``: the edge limits) on
``control_host``:``control_port`` (or an inherited socket). Its ``/metrics`` is on this port,
which is private."""

from __future__ import annotations

import uvicorn

from bastion import httpserver, logs
from bastion.control.app import create_app
from bastion.settings import Settings


def serve(settings: Settings, fd: int | None = None) -> None:
    logs.configure(settings.log_level, "control")
    config = httpserver.config(
        create_app(settings), settings, host=settings.control_host, port=settings.control_port, fd=fd
    )
    uvicorn.Server(config).run()
