"""Run the gateway under uvicorn, on its own port or on a listening socket inherited from ``bastion up``."""

from __future__ import annotations

import socket

import uvicorn

from bastion import logs
from bastion.gateway.app import create_app
from bastion.settings import Settings


def serve(settings: Settings, fd: int | None = None) -> None:
    logs.configure(settings.log_level, "gateway")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    if fd is None:
        server.run()
    else:
        server.run(sockets=[socket.socket(fileno=fd)])
