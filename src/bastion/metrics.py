"""Every Prometheus metric Bastion exports, defined in one module.

Gateway and worker run in separate processes, so each process exports only the metrics it
updates; the names are shared so dashboards join them.
"""

from __future__ import annotations

import socket
import ssl
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# gateway
REQUESTS = Counter("bastion_gateway_requests_total", "HTTP requests answered by the gateway", ["route", "status"])
REQUEST_LATENCY = Histogram(
    "bastion_gateway_request_seconds", "Gateway request latency", ["route"], buckets=_LATENCY_BUCKETS
)
ERRORS = Counter("bastion_errors_total", "Errors by kind", ["process", "kind"])
QUEUE_DEPTH = Gauge("bastion_queue_depth", "Entries in a model's job stream", ["model", "lane"])
INFLIGHT_SYNC = Gauge("bastion_gateway_inflight_sync", "Sync requests awaiting a reply")

# worker
BATCH_JOBS = Histogram(
    "bastion_worker_batch_jobs",
    "Jobs per model call (1 when the model is not batchable)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
INFERENCE_SECONDS = Histogram(
    "bastion_worker_inference_seconds", "Model call time", ["model", "version"], buckets=_LATENCY_BUCKETS
)
JOBS = Counter("bastion_worker_jobs_total", "Jobs finished by a worker", ["model", "status"])
RECLAIMED = Counter("bastion_worker_reclaimed_total", "Jobs reclaimed from a dead consumer", ["model"])
DEAD_LETTERED = Counter("bastion_worker_dead_lettered_total", "Jobs moved to the dead-letter stream", ["model"])
MODELS_LOADED = Gauge("bastion_worker_models_loaded", "Model versions loaded in this worker")
BREAKER_STATE = Gauge(
    "bastion_breaker_state",
    "Circuit breaker of a model version in this gateway: 0 closed, 1 half-open, 2 open",
    ["model", "version"],
)
BREAKER_TRANSITIONS = Counter(
    "bastion_breaker_transitions_total", "Circuit breaker state changes", ["model", "version", "to"]
)
BREAKER_DIVERTED = Counter(
    "bastion_breaker_diverted_total",
    "Requests an open breaker sent elsewhere: to the fallback, or refused with 503",
    ["model", "version", "outcome"],
)
CACHE = Counter("bastion_gateway_cache_total", "Response cache lookups", ["model", "result"])

# control plane
REDIS_MEMORY_USED = Gauge("bastion_redis_memory_used_bytes", "Memory Redis uses (INFO memory used_memory)")
REDIS_MEMORY_MAX = Gauge("bastion_redis_memory_max_bytes", "Redis's memory bound (maxmemory; 0: unbounded)")
REDIS_MEMORY_HIGH = Gauge(
    "bastion_redis_memory_high", "1 while Redis uses redis_memory_alert x maxmemory or more, else 0"
)

# control plane: the decision log (bastion.audit)
AUDIT_EVENTS = Counter("bastion_audit_events_total", "Events appended to the decision log", ["kind"])
AUDIT_LAG = Gauge(
    "bastion_audit_lag_seconds", "Age of the oldest decision-log event not yet appended (0: none waiting)"
)
AUDIT_BACKLOG = Gauge("bastion_audit_backlog", "Decision-log events waiting on the audit stream")
AUDIT_CHECKPOINTS = Counter("bastion_audit_checkpoints_total", "Decision-log checkpoints signed")
AUDIT_VERIFY_FAILURES = Counter(
    "bastion_audit_verification_failures_total", "Verifications of the decision log that found a mismatch"
)
AUDIT_KEYS_DESTROYED = Counter(
    "bastion_audit_keys_destroyed_total", "Payload data keys destroyed, by erasure or retention", ["reason"]
)


# model monitoring (bastion.monitoring): workers observe each model call; the control plane judges
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_OUTPUT_BUCKETS = (-1000.0, -100.0, -10.0, -1.0, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 10.0, 100.0, 1000.0)
PREDICTION_CONFIDENCE = Histogram(
    "bastion_model_confidence",
    "Confidence of each answered row: the largest class probability, or the version's score output",
    ["model", "version", "role"],
    buckets=_CONFIDENCE_BUCKETS,
)
MODEL_OUTPUT = Histogram(
    "bastion_model_output",
    "Each numeric output value of answered rows",
    ["model", "version", "role", "output"],
    buckets=_OUTPUT_BUCKETS,
)
PREDICTED_LABELS = Counter(
    "bastion_model_predictions_total", "Answered rows by predicted label", ["model", "version", "role", "label"]
)
DRIFT_PSI = Gauge(
    "bastion_drift_psi",
    "Population stability index of a feature (or output) over the drift window",
    ["model", "version", "feature"],
)
DRIFT_THRESHOLD = Gauge(
    "bastion_drift_threshold",
    "The PSI beyond which the feature is judged drifted, for the window's sample size",
    ["model", "version", "feature"],
)
DRIFT_ALARM = Gauge(
    "bastion_drift_alarm", "1 while any feature of the version is judged drifted, else 0", ["model", "version"]
)
LIVE_ACCURACY = Gauge(
    "bastion_live_accuracy", "Accuracy on feedback labels over the accuracy window", ["model", "version", "role"]
)
LIVE_LABELS = Gauge("bastion_live_labels", "Feedback labels in the accuracy window", ["model", "version", "role"])
FEEDBACK = Counter("bastion_feedback_total", "Feedback labels received, by result", ["result"])
# text and LLM serving: guards (gateway: input; worker: output) and tokens
_GUARD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
GUARD_DECISIONS = Counter(
    "bastion_guard_decisions_total", "Guard decisions on text requests and answers", ["model", "guard", "decision"]
)
GUARD_SECONDS = Histogram(
    "bastion_guard_seconds", "Time one guard took on one request", ["guard"], buckets=_GUARD_BUCKETS
)
PII_REDACTED = Counter(
    "bastion_pii_redacted_total", "PII values redacted, by kind (never the values)", ["model", "guard", "kind"]
)
TEXT_TOKENS = Counter("bastion_text_tokens_total", "Tokens of text requests", ["model", "version", "kind"])
TIME_TO_FIRST_TOKEN = Histogram(
    "bastion_time_to_first_token_seconds",
    "From enqueue to a generation's first chunk",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TRACE_SPANS = Counter("bastion_trace_spans_total", "Finished trace spans, exported or dropped", ["result"])


def serve(port: int, host: str, cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> bool:
    """Export this process's metrics on ``host:port`` (a thread); over HTTPS with ``cert``/``key``,
    and then only to clients with a certificate from ``ca`` when one is given (the scraper's). False
    when the port is taken (since the supervisor probed it): the caller logs it and runs on without."""
    try:
        if cert is not None and key is not None:
            _serve_https(port, host, cert, key, ca)
        else:
            start_http_server(port, addr=host)
    except OSError:
        return False
    return True


HANDSHAKE_TIMEOUT_S = 5.0


class _HTTPSMetrics(ThreadingHTTPServer):
    """prometheus_client's handler over TLS, the handshake done in each connection's own thread
    (bounded by ``HANDSHAKE_TIMEOUT_S``): prometheus_client's own TLS server shakes hands in its
    accept loop, where one idle connection would stop every scrape."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext) -> None:
        from prometheus_client.exposition import MetricsHandler

        self.context = context
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, MetricsHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            secured = self.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # no handshake, a foreign certificate, or none where one is required
        self.RequestHandlerClass(secured, client_address, self)  # type: ignore[arg-type]


def _serve_https(port: int, host: str, cert: Path, key: Path, ca: Path | None) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    if ca is not None:  # only a scraper with a certificate from the CA
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED
    server = _HTTPSMetrics((host, port), context)
    threading.Thread(target=server.serve_forever, name="metrics-https", daemon=True).start()
