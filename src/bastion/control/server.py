"""Run the control plane's admin API under uvicorn on its own port (or an inherited socket)."""

from __future__ import annotations

import uvicorn

from bastion import logs
from bastion.control.app import create_app
from bastion.settings import Settings


def serve(settings: Settings, fd: int | None = None) -> None:
    logs.configure(settings.log_level, "control")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.control_port,
        fd=fd,
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
