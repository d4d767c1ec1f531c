"""Run the gateway under uvicorn (``bastion.httpserver``: the edge limits), on its own port or on a
listening socket inherited from ``bastion up``; its Prometheus metrics on ``gateway_metrics_port``
at ``control_host`` when that is set (private: not on the public port; a port already taken leaves
them off with a ``metrics_port_in_use`` warning). With ``tls_cert``, HTTPS (and TLS on the gRPC
port) from a certificate reloaded on SIGHUP (``bastion.security.tls``)."""

from __future__ import annotations

import gc
import socket
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from bastion import httpserver, logs, metrics
from bastion.gateway.app import create_app
from bastion.security import tls
from bastion.settings import Settings

log = logs.get("bastion.gateway")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT the gateway reports not ready (``/readyz`` 503) and keeps
    serving for ``drain_s``, so a load balancer stops sending before the listener closes; then
    uvicorn's graceful shutdown finishes the requests in flight. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_s = drain_s
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self._app.state, "gateway", None)
        if self._drain_s <= 0 or state is None or self._timer is not None:
            super().handle_exit(sig, frame)
            return
        state.draining = True
        log.info("gateway_draining", seconds=self._drain_s)
        self._timer = threading.Timer(self._drain_s, super().handle_exit, (sig, None))
        self._timer.daemon = True
        self._timer.start()


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
    listener = tls.listener(settings)
    app = create_app(settings, listener)
    config = httpserver.config(
        app, settings, host=settings.host, port=settings.gateway_port, tls=listener, backlog=2048
    )
    server = DrainingServer(config, app, settings.drain_s)
    if settings.gateway_metrics_port:
        if not metrics.serve(
            settings.gateway_metrics_port, settings.control_host, settings.tls_cert, settings.tls_key, settings.tls_ca
        ):
            log.warning("metrics_port_in_use", port=settings.gateway_metrics_port, host=settings.control_host)
    tune_gc()
    if fd is None:
        server.run()
    else:
        server.run(sockets=[socket.socket(fileno=fd)])
