"""Start a worker process: settings in, loop until SIGTERM. Its metrics (``worker_metrics_port``)
listen on ``control_host``, the private address of the admin API, never on the public ``host``; a
port already taken leaves them off with a ``metrics_port_in_use`` warning. Tracing is on when the
``OTEL_*`` environment asks for it (``bastion.tracing``), set up in each process after a prefork.

The worker loop confines itself (``bastion.worker.confine``, docs/sandbox.md) once its Redis client
exists and before it reads an artifact or starts a thread: the metrics server and the trace
exporter start after, confined with it."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from bastion import logs, metrics, tracing
from bastion.artifacts.store import ArtifactStore
from bastion.redisconn import sync_client
from bastion.runtime.base import Runtime
from bastion.runtime.onnx import OnnxRuntime
from bastion.security import tls
from bastion.settings import Settings
from bastion.worker import confine
from bastion.worker.models import ModelCache
from bastion.worker.prefork import Prefork
from bastion.worker.service import Worker

log = logs.get("bastion.worker")


def run(settings: Settings, runtime: Runtime | None = None) -> None:
    """``runtime``: what loads and runs models (onnxruntime unless given; tests pass a fake)."""
    logs.configure(settings.log_level, "worker")
    name = settings.worker_name or f"{socket.gethostname()}-{os.getpid()}"
    runtime = runtime or OnnxRuntime(settings.ort_intra_threads, settings.ort_inter_threads)
    confinement = confine.Confinement.from_settings(settings)
    if confinement.enabled:
        confine.prepare()  # once, in the master: a confined loop could not load libseccomp
    # Confined, the loop is always a fresh fork: the imports above start native threads (numpy's,
    # onnxruntime's) that a confinement applied here would not reach; a fork has one thread.
    if settings.worker_prefork or confinement.enabled:
        Prefork(lambda: serve(settings, name, runtime, confinement)).run()
    else:
        serve(settings, name, runtime, confinement)


def serve(
    settings: Settings, name: str, runtime: Runtime | None = None, confinement: confine.Confinement | None = None
) -> None:
    """The worker loop, until SIGTERM."""
    client = sync_client(
        settings.require_redis_url(), tls.files_of(settings), socket_connect_timeout=2, socket_timeout=10
    )
    artifacts = settings.resolved_artifact_dir.absolute()
    try:  # Landlock grants what exists when the loop confines itself: a directory made later stays closed
        artifacts.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("artifact_dir_unavailable", path=str(artifacts), error_type=type(exc).__name__)
    cache = ModelCache(
        ArtifactStore(artifacts),
        runtime or OnnxRuntime(settings.ort_intra_threads, settings.ort_inter_threads),
        retry_s=settings.model_retry_s,
    )
    confinement = confinement or confine.Confinement.from_settings(settings)
    tls_files = confine.identities(confinement.tls_files)
    confine.confine(confinement)  # before any thread
    if confinement.enabled and tls_files:
        threading.Thread(target=_stop_when_replaced, args=(tls_files,), name="tls-files", daemon=True).start()
    if settings.worker_metrics_port:
        if not metrics.serve(  # private, as the admin API; HTTPS and client certificates with tls_*
            settings.worker_metrics_port, settings.control_host, settings.tls_cert, settings.tls_key, settings.tls_ca
        ):
            log.warning("metrics_port_in_use", port=settings.worker_metrics_port, host=settings.control_host)
    tracing.configure("worker")  # here, after a prefork: each process its own exporter thread
    worker = Worker(settings, client, cache, name)
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        client.close()
        tracing.shutdown()


def _stop_when_replaced(files: dict[Path, tuple[int, int]], interval_s: float = 5.0) -> None:
    """Stop this worker loop (gracefully, as SIGTERM does) once a TLS file it was confined to is
    replaced (a rotation): Landlock lets it read only the old files, so a reconnect would fail.
    The prefork master (or ``bastion up``'s supervisor) starts it again, confined to the new ones."""
    while not (changed := confine.replaced(files)):
        time.sleep(interval_s)
    log.warning("tls_files_replaced", paths=[str(p) for p in changed], action="restarting the worker loop")
    os.kill(os.getpid(), signal.SIGTERM)
