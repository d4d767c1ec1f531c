"""Run the gateway under uvicorn, on its own port or on a listening socket inherited from ``bastion up``."""

from __future__ import annotations

import gc
import socket

import uvicorn

from bastion import logs
from bastion.gateway.app import create_app
from bastion.settings import Settings


def tune_gc() -> None:
    """Keep the long-lived start-up objects out of collections and collect less often.

    A sync request lives for a few milliseconds, long enough for its objects to be promoted
    past generation 0; with the default thresholds the gateway then runs full collections
    several times a second, each a pause of tens of milliseconds that lands on p99.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


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
    tune_gc()
    if fd is None:
        server.run()
    else:
        server.run(sockets=[socket.socket(fileno=fd)])
