"""Start a worker process: settings in, loop until SIGTERM. Its metrics (``worker_metrics_port``)
listen on ``control_host``, the private address of the admin API, never on the public ``host``; a
port already taken leaves them off with a ``metrics_port_in_use`` warning. Tracing is on when the
``OTEL_*`` environment asks for it (``bastion.tracing``), set up in each process after a prefork."""

from __future__ import annotations

import os
import socket

from bastion import logs, metrics, tracing
from bastion.artifacts.store import ArtifactStore
from bastion.redisconn import sync_client
from bastion.runtime.onnx import OnnxRuntime
from bastion.security import tls
from bastion.settings import Settings
from bastion.worker.models import ModelCache
from bastion.worker.prefork import Prefork
from bastion.worker.service import Worker

log = logs.get("bastion.worker")


def run(settings: Settings) -> None:
    logs.configure(settings.log_level, "worker")
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    if settings.worker_prefork:
        Prefork(lambda: serve(settings, name)).run()
    else:
        serve(settings, name)


def serve(settings: Settings, name: str) -> None:
    """The worker loop, until SIGTERM."""
    if settings.worker_metrics_port:
        if not metrics.serve(  # private, as the admin API; HTTPS and client certificates with tls_*
            settings.worker_metrics_port, settings.control_host, settings.tls_cert, settings.tls_key, settings.tls_ca
        ):
            log.warning("metrics_port_in_use", port=settings.worker_metrics_port, host=settings.control_host)
    client = sync_client(
        settings.require_redis_url(), tls.files_of(settings), socket_connect_timeout=2, socket_timeout=10
    )
    cache = ModelCache(
        ArtifactStore(settings.resolved_artifact_dir),
        OnnxRuntime(settings.ort_intra_threads, settings.ort_inter_threads),
        retry_s=settings.model_retry_s,
    )
    tracing.configure("worker")  # here, after a prefork: each process its own exporter thread
    worker = Worker(settings, client, cache, name)
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        client.close()
        tracing.shutdown()
