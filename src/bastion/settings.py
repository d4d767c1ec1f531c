"""Typed settings, built once by an entry point and passed in.

Every field can be set by an environment variable ``BASTION_<FIELD>`` (upper case) and, for
``bastion up``, by a flag of the same name. Nothing here does I/O at import time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".bastion"


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), further bounded by a cgroup
    CPU quota (``docker --cpus``, Kubernetes CPU limits), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity masks
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup in whole CPUs (rounded up), or None without one."""
    try:
        text = (root / "cpu.max").read_text().split()  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (float(text[0]) if text[0] != "max" else -1.0), float(text[1])
    except (OSError, IndexError, ValueError):
        try:  # cgroup v1
            quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
            period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


# How bastion up sizes itself when --gateways / --workers are not given: the gateways parse,
# check and queue every request, so one per CPU; a worker runs batches of up to max_batch rows
# with one onnxruntime thread per session, so one per 4 CPUs is enough to keep up with them.
MAX_AUTO_PROCESSES = 8
GATEWAYS_RULE = f"one per CPU, 1 to {MAX_AUTO_PROCESSES}"
WORKERS_RULE = f"one per 4 CPUs, 1 to {MAX_AUTO_PROCESSES}"


def default_gateways() -> int:
    return min(MAX_AUTO_PROCESSES, usable_cpus())


def default_workers() -> int:
    return max(1, min(MAX_AUTO_PROCESSES, usable_cpus() // 4))


class Settings(BaseSettings):
    """All of Bastion's settings. Processes read only the fields they need."""

    model_config = SettingsConfigDict(env_prefix="BASTION_", extra="ignore")

    environment: Literal["development", "production"] = Field(
        default="development", description="development or production (production refuses placeholder secrets)"
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="directory holding the SQLite database, artifacts, embedded Redis and the admin key",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis to use (redis://, rediss://, unix://); unset: bastion up starts an embedded one",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the control-plane database; unset: SQLite in the data directory"
    )
    artifact_dir: Path | None = Field(default=None, description="artifact store directory; unset: <data_dir>/artifacts")
    log_level: str = Field(default="info", description="log level (debug, info, warning, error)")

    host: str = Field(default="127.0.0.1", description="address the public gateway listens on")
    control_host: str = Field(
        default="127.0.0.1",
        description="address the admin API (control plane) and the metrics ports listen on; metrics need no "
        "credentials, so keep it private",
    )
    gateway_port: int = Field(default=8000, ge=0, le=65535, description="public gateway port")
    control_port: int = Field(default=8001, ge=0, le=65535, description="admin API (control plane) port")
    grpc_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Open Inference Protocol v2 over gRPC (inference.GRPCInferenceService) on this port of --host, "
        "served by every gateway process (SO_REUSEPORT); 0: off",
    )
    grpc_max_message_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="largest gRPC message received or sent, bytes (as max_body_bytes for HTTP): RESOURCE_EXHAUSTED "
        "beyond",
    )
    grpc_max_concurrent_streams: int = Field(
        default=100, ge=1, description="concurrent gRPC streams (calls) one connection may open"
    )
    grpc_keepalive_min_s: float = Field(
        default=10.0,
        gt=0,
        description="least time between a client's keepalive pings, seconds; a client that pings more often is "
        "disconnected (GOAWAY too_many_pings)",
    )
    grpc_max_connection_idle_s: float = Field(
        default=300.0, gt=0, description="a gRPC connection with no call for this long is closed, seconds"
    )
    worker_confine: bool = Field(
        default=True,
        description="confine the model-running processes (no new privileges, an unprivileged uid when started as "
        "root, resource limits, seccomp, Landlock; docs/sandbox.md); false: none of it",
    )
    worker_uid: int = Field(
        default=65532, ge=1, description="uid and gid a worker started as root switches to before it reads an artifact"
    )
    worker_memory_mb: int = Field(
        default=4096, ge=256, description="address-space limit (RLIMIT_AS) of a worker process, MiB"
    )
    worker_max_files: int = Field(default=256, ge=32, description="open-file limit (RLIMIT_NOFILE) of a worker process")
    worker_max_procs: int = Field(
        default=256,
        ge=16,
        description="process limit (RLIMIT_NPROC, threads included, machine-wide) of the uid a root-started worker "
        "switches to; not set for a worker started as an ordinary user",
    )
    tls_cert: Path | None = Field(
        default=None,
        description="this process's certificate (PEM): its server certificate where it listens (HTTPS, gRPC, "
        "admin API), its client certificate where it connects (Redis, PostgreSQL); reloaded on SIGHUP",
    )
    tls_key: Path | None = Field(default=None, description="the private key (PEM) of tls_cert")
    tls_ca: Path | None = Field(
        default=None, description="CA bundle (PEM) that verifies peers: Redis and PostgreSQL servers, admin clients"
    )
    admin_client_certs: Literal["off", "optional", "required"] = Field(
        default="off",
        description="client certificates on the admin API (mTLS, signed by tls_ca): off, optional, or required",
    )
    admin_client_ca: Path | None = Field(
        default=None,
        description="CA bundle (PEM) that signs admin client certificates; unset: tls_ca. A CA of their own keeps a "
        "certificate issued for anything else (a shared issuer's) from being taken for an admin's",
    )
    admin_cert_principals: str = Field(
        default="",
        description="client-certificate common names that are admin principals, as CN=scope[+scope],...  "
        "(e.g. admin=admin,auditor=audit); a mapped certificate needs no Bearer key",
    )
    tls: bool = Field(
        default=False,
        description="bastion up: TLS on every hop - a private CA and a certificate per role in <data_dir>/tls, "
        "the embedded Redis over TLS (needs a redis-server built with TLS, e.g. Debian's), HTTPS on the gateway "
        "and admin API",
    )
    require_tls: bool = Field(
        default=False, description="refuse to start when any hop (Redis, database, listeners, tracing) is plaintext"
    )
    gateways: int = Field(
        default_factory=default_gateways,
        ge=1,
        le=64,
        description=f"gateway processes sharing the gateway port; unset: {GATEWAYS_RULE}",
        json_schema_extra={"default_text": GATEWAYS_RULE},
    )
    workers: int = Field(
        default_factory=default_workers,
        ge=1,
        le=256,
        description=f"worker processes; unset: {WORKERS_RULE}",
        json_schema_extra={"default_text": WORKERS_RULE},
    )
    gateway_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="id of this gateway process (names its reply stream); unset: generated",
    )

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest request body the gateway reads")
    max_admin_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest JSON body of an admin route (artifact uploads: max_upload_bytes)"
    )
    max_header_bytes: int = Field(
        default=32 << 10, ge=1024, description="largest request head (request line and all headers), bytes: 431 beyond"
    )
    max_headers: int = Field(default=100, ge=8, description="most header fields in one request: 431 beyond")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="time a client has to send a request's head, seconds; then it is closed"
    )
    body_timeout_s: float = Field(
        default=15.0, gt=0, description="time a client has to send a request's body after its head, seconds: 408"
    )
    max_connections: int = Field(
        default=4096, ge=16, description="open connections one HTTP process accepts; beyond them new ones get 503"
    )
    max_connections_per_client: int = Field(
        default=256,
        ge=1,
        description="open connections one client address (an IPv6 /64 counts as one) may hold on one HTTP process",
    )
    public_metrics: bool = Field(
        default=False, description="also serve /metrics on the public gateway port (off: only on the metrics port)"
    )
    gateway_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="first gateway metrics port on control_host (gateway i listens on port+i); 0: off "
        "(bastion up defaults it to 9101)",
    )
    max_upload_bytes: int = Field(
        default=256 << 20, ge=1024, description="largest model artifact the control plane accepts"
    )
    artifact_check_memory_mb: int = Field(
        default=2048, ge=256, description="address-space limit of the subprocess that checks an uploaded ONNX, MiB"
    )
    artifact_check_timeout_s: float = Field(
        default=60.0, gt=0, description="time the ONNX check subprocess may take, seconds"
    )
    max_metadata_bytes: int = Field(
        default=64 << 10, ge=1024, description="largest metadata (labels, description, post-processing) of a version"
    )
    max_rows: int = Field(default=1024, ge=1, description="most rows in one prediction request")
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="default and largest deadline of a sync request, seconds"
    )
    max_queue_sync: int = Field(
        default=10_000, ge=1, description="sync-lane queue length beyond which requests get 503 + Retry-After"
    )
    max_queue_batch: int = Field(
        default=200_000, ge=1, description="async-lane queue length beyond which job submissions get 503"
    )
    max_queue_shadow: int = Field(
        default=10_000, ge=1, description="shadow-lane queue length beyond which shadow copies are dropped (counted)"
    )
    result_ttl_s: int = Field(default=3600, ge=1, description="how long an async job result is kept, seconds")
    max_stored_results: int = Field(
        default=10_000, ge=1, description="async job results one tenant may hold at once (queued ones count): 429"
    )
    max_stored_result_bytes: int = Field(
        default=64 << 20, ge=1024, description="bytes of async job results one tenant may hold at once: 429"
    )
    result_cost_per_kib: float = Field(
        default=1.0, ge=0, description="compute units charged per KiB of a stored async result, on top of its run"
    )
    max_dead_letters: int = Field(default=1000, ge=1, description="dead letters kept per model (oldest go first)")
    dead_letter_max_age_s: int = Field(
        default=7 * 86_400, ge=60, description="dead letters older than this are dropped, seconds"
    )
    dead_letter_max_input_bytes: int = Field(
        default=64 << 10,
        ge=0,
        description="a dead letter keeps its job's input only up to this size (larger: digest only, not replayable)",
    )
    max_streams_per_key: int = Field(default=16, ge=1, description="open job event streams (SSE) one API key may hold")
    redis_maxmemory_mb: int = Field(
        default=1024, ge=16, description="memory bound of the embedded Redis (maxmemory, noeviction), MiB"
    )
    redis_memory_alert: float = Field(
        default=0.8, gt=0, le=1, description="share of Redis maxmemory at which the control plane raises its alert"
    )
    sync_result_ttl_s: int = Field(
        default=120, ge=1, description="how long a sync job outcome is kept for redelivery idempotency, seconds"
    )
    snapshot_refresh_s: float = Field(
        default=5.0, gt=0, description="how often gateways and workers re-check the snapshot without a notice, seconds"
    )

    warm_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="how long a deployment change waits for workers to load and warm up new versions, seconds",
    )

    drain_s: float = Field(
        default=2.0,
        ge=0,
        description="on SIGTERM a gateway reports not ready and keeps serving this long before it stops, seconds",
    )
    durability: Literal["everysec", "always", "waitaof", "replicas"] = Field(
        default="everysec",
        description="when a 202 is said: everysec (AOF written, fsynced each second: survives a Redis crash), "
        "always (embedded Redis fsyncs every write: survives a machine crash), waitaof (WAITAOF: the local AOF "
        "is fsynced before the answer; Redis >= 7.2), replicas (WAIT: durability_replicas replicas have it)",
    )
    durability_replicas: int = Field(default=1, ge=1, le=16, description="replicas WAIT needs under 'replicas'")
    durability_timeout_ms: int = Field(
        default=1000, ge=1, le=4000, description="how long WAIT/WAITAOF may take before the answer is 503, milliseconds"
    )
    breaker_window: int = Field(
        default=20, ge=2, description="calls per (model, version) a gateway's circuit breaker judges over"
    )
    breaker_min_calls: int = Field(default=10, ge=1, description="calls in the window before the breaker may open")
    breaker_failure_rate: float = Field(
        default=0.5, gt=0, le=1, description="share of failed calls in the window that opens the breaker"
    )
    breaker_slow_rate: float = Field(
        default=0.8, gt=0, le=1, description="share of slow calls in the window that opens the breaker"
    )
    breaker_slow_s: float = Field(default=5.0, gt=0, description="a call slower than this counts as slow, seconds")
    breaker_open_s: float = Field(default=5.0, gt=0, description="how long an open breaker waits before probing")
    breaker_probes: int = Field(
        default=3, ge=1, description="probe calls let through while half-open; all must succeed to close"
    )

    redis_max_connections: int = Field(
        default=64, ge=8, le=10_000, description="Redis connections per gateway process (bursts wait for one)"
    )
    rate_tiers: str = Field(
        default='{"standard": {"units_per_s": 20000, "burst": 40000}, "unlimited": {}}',
        description="per-key rate tiers as JSON: name -> {units_per_s, burst} in compute units (1 unit = 1 ms "
        "of worker inference); a tier without burst is unlimited",
    )
    default_tier: str = Field(default="standard", description="rate tier of keys created without one")
    cost_per_row_default: float = Field(
        default=0.1, gt=0, description="estimated compute units per row of a model version not yet measured"
    )
    cost_per_row_floor: float = Field(
        default=0.01, gt=0, description="lowest price of a row, compute units, however cheap a version measures"
    )

    max_batch: int = Field(default=64, ge=1, description="most jobs a worker runs in one model call")
    max_wait_ms: float = Field(
        default=0.0, ge=0, description="how long a worker waits to fill a batch, milliseconds (0: batch what is queued)"
    )
    visibility_timeout_s: float = Field(
        default=30.0, gt=0, description="idle time after which another worker reclaims a pending job, seconds"
    )
    max_deliveries: int = Field(
        default=3, ge=1, description="deliveries after which a job goes to the dead-letter stream"
    )
    max_job_s: float = Field(
        default=600.0,
        gt=0,
        description="a model call still running after this long is stopped and its jobs redelivered (counted); one "
        "that ignores the stop for 10 s more ends its worker, which bastion up restarts; seconds",
    )
    worker_prefork: bool = Field(
        default=True,
        description="a worker process is a master that forks its loop and forks it again when it dies "
        "(a restart in milliseconds, not a fresh start); always so while worker_confine is on",
    )
    isolate_redelivered: bool = Field(
        default=True,
        description="run a redelivered job in a child process (forked), so a job that kills its process "
        "kills only the child",
    )
    model_retry_s: float = Field(
        default=30.0, gt=0, description="how long a worker waits before loading a refused model version again, seconds"
    )
    consumer_expiry_s: float = Field(
        default=600.0,
        gt=0,
        description="a stream consumer (a worker name) idle this long with nothing pending is removed, seconds",
    )
    ort_intra_threads: int = Field(
        default=1, ge=0, description="onnxruntime intra-op threads per session (0: onnxruntime decides)"
    )
    ort_inter_threads: int = Field(
        default=1, ge=0, description="onnxruntime inter-op threads per session (0: onnxruntime decides)"
    )
    worker_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="first worker metrics port on control_host (worker i listens on port+i); 0: off "
        "(bastion up defaults it to 9201)",
    )
    worker_models: str = Field(default="", description="comma-separated models a worker serves; empty: all")
    worker_name: str | None = Field(
        default=None, description="consumer name of this worker in the stream groups; unset: host-pid"
    )

    admin_key: SecretStr | None = Field(
        default=None, description="an extra admin key accepted by the control plane (secret; prefer a file)"
    )
    oidc_issuer: str | None = Field(
        default=None, description="accept JWT bearer tokens from this OIDC issuer (its 'iss'); unset: API keys only"
    )
    oidc_audience: str | None = Field(default=None, description="the 'aud' JWT tokens must carry (required with OIDC)")
    oidc_jwks_url: str | None = Field(
        default=None,
        description="the issuer's JWKS URL; unset: found through <issuer>/.well-known/openid-configuration",
    )
    oidc_algorithms: str = Field(default="RS256,ES256,EdDSA", description="JWT algorithms accepted (never none/HS*)")
    oidc_tenant_claim: str = Field(default="tenant", description="JWT claim naming the caller's tenant")
    oidc_scopes_claim: str = Field(default="scope", description="JWT claim with the scopes (space-separated or a list)")
    oidc_subject_claim: str | None = Field(
        default=None,
        description="JWT claim naming the data subject a token acts for (e.g. sub): the decision log records its "
        "keyed pseudonym, never the value; unset: a token's decisions name no subject",
    )
    oidc_jwks_cache_s: float = Field(default=300.0, gt=0, description="how long fetched signing keys are trusted")
    trusted_proxies: str = Field(
        default="", description="comma-separated addresses/CIDRs whose X-Forwarded-For names the client"
    )
    abuse_window_s: int = Field(default=60, ge=1, description="window over which a client's failures are counted")
    abuse_tarpit_after: int = Field(default=10, ge=1, description="failures in the window before answers slow down")
    abuse_ban_after: int = Field(default=30, ge=1, description="failures in the window that get a client banned")
    abuse_tarpit_step_ms: int = Field(default=100, ge=0, description="extra delay per failure past the tarpit line")
    abuse_tarpit_max_ms: int = Field(default=5000, ge=0, description="longest delay of a tarpitted answer")
    abuse_ban_s: int = Field(default=60, ge=1, description="first ban; each further ban within a day doubles")
    abuse_ban_max_s: int = Field(default=86_400, ge=1, description="longest ban")
    abuse_max_bans: int = Field(
        default=100_000, ge=16, description="bans a gateway keeps in memory (least recently refreshed go first)"
    )
    cors_origins: str = Field(
        default="", description="comma-separated browser origins allowed to call the gateway; empty: CORS off"
    )
    docs_enabled: bool = Field(default=False, description="serve /docs and /openapi.json")

    # the decision log (bastion.audit)
    decision_log: bool = Field(
        default=True,
        description="record every decision (answered prediction, finished job, cache hit) in the decision log",
    )
    audit_max_backlog: int = Field(
        default=200_000,
        ge=1,
        description="decision-log events waiting for the control plane beyond which gateways answer 503 to new work "
        "(evidence is never dropped)",
    )
    audit_signing_key_file: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs the decision log's checkpoints; unset: "
        "<data_dir>/audit-signing.pem, created in development, required in production",
    )
    audit_kek: SecretStr | None = Field(
        default=None,
        description="key-encryption key of the decision log's data keys and tenant secrets: 32 bytes, base64; "
        "takes precedence over audit_kek_file",
    )
    audit_kek_file: Path | None = Field(
        default=None,
        description="file holding the key-encryption key (32 bytes, base64); unset: <data_dir>/audit.kek, created "
        "in development, required in production",
    )
    audit_checkpoint_s: float = Field(
        default=1.0, gt=0, description="the decision log signs a checkpoint at least this often when it grew, seconds"
    )
    audit_checkpoint_events: int = Field(
        default=10_000, ge=1, description="... or as soon as this many events were appended since the last one"
    )
    audit_batch: int = Field(
        default=1000, ge=1, le=10_000, description="decision-log events the control plane appends in one transaction"
    )
    audit_retention_sweep_s: float = Field(
        default=60.0, gt=0, description="how often payloads past their tenant's retention are destroyed, seconds"
    )

    # text and LLM serving (bastion.text, the OpenAI-compatible routes, bastion.guards)
    max_tokenizer_bytes: int = Field(
        default=64 << 20, ge=1024, le=64 << 20, description="largest tokenizer JSON a text version may carry, bytes"
    )
    max_prompt_chars: int = Field(
        default=262_144,
        ge=1,
        le=262_144,
        description="longest text one OpenAI-route request may carry (all messages, or all inputs), characters",
    )
    max_messages: int = Field(default=256, ge=1, le=10_000, description="most messages in one chat request")
    max_embedding_inputs: int = Field(default=256, ge=1, le=2048, description="most strings in one embeddings request")
    stream_keepalive_s: float = Field(
        default=10.0, gt=0, le=60, description="an SSE answer with nothing new for this long gets a keep-alive comment"
    )
    text_stream_ttl_s: int = Field(
        default=300, ge=10, le=86_400, description="how long a generation's chunk stream s:{job} and cancel flag live"
    )
    upstream_hosts: str = Field(
        default="",
        description="host:port pairs (comma-separated) of OpenAI-compatible servers a worker may forward "
        "generation to (upstream versions); a version naming any other is refused by the worker, and a "
        "confined worker can connect to no other",
    )
    generation_batch: int = Field(
        default=16, ge=1, le=256, description="most generations a worker steps together (continuous batching)"
    )

    # observability: tracing is configured by the standard OTEL_* variables (bastion.tracing)
    # model monitoring (bastion.monitoring): metrics per version, drift, feedback and live accuracy
    monitoring: bool = Field(
        default=True,
        description="count live inputs and outputs into each version's drift bins (workers), judge drift "
        "(control plane) and keep each decision's outcome for live accuracy (decision log)",
    )
    monitoring_bins: int = Field(
        default=10, ge=2, le=50, description="drift bins per feature, cut at the reference sample's quantiles"
    )
    monitoring_flush_s: float = Field(
        default=1.0, gt=0, le=60, description="how often a worker adds its drift counts to Redis, seconds"
    )
    monitoring_retention_s: int = Field(
        default=86_400,
        ge=120,
        description="how long a one-minute drift bucket lives in Redis (the longest window that can be asked for)",
    )
    drift_window_s: int = Field(
        default=3600, ge=60, description="sliding window over which drift is judged by default, seconds"
    )
    drift_alpha: float = Field(
        default=0.01,
        gt=0,
        lt=0.5,
        description="false-alarm probability per version and window: the chi-square threshold of each feature "
        "is set at alpha divided by the number of features judged and by the judgements made while one window "
        "passes (Bonferroni)",
    )
    drift_min_rows: int = Field(
        default=100, ge=1, description="live rows a version needs in the window before its drift is judged"
    )
    drift_interval_s: float = Field(
        default=15.0, gt=0, description="how often the control plane judges drift and updates its gauges, seconds"
    )
    feedback_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="how long a gateway waits for the control plane to record a label"
    )
    accuracy_window_s: int = Field(
        default=7 * 86_400, ge=60, description="window of live accuracy (labels of predictions made since), seconds"
    )

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("BASTION_OIDC_AUDIENCE is required with BASTION_OIDC_ISSUER")
        unsafe = {a.strip().upper() for a in self.oidc_algorithms.split(",")} & {"NONE", "HS256", "HS384", "HS512"}
        if unsafe:
            raise ValueError(f"BASTION_OIDC_ALGORITHMS must not include {sorted(unsafe)}")
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("BASTION_TLS_CERT and BASTION_TLS_KEY go together")
        if self.admin_client_certs != "off" and (self.tls_cert is None or self.tls_ca is None):
            raise ValueError("BASTION_ADMIN_CLIENT_CERTS needs BASTION_TLS_CERT, BASTION_TLS_KEY and BASTION_TLS_CA")
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment == "production" and self.admin_key is not None:
            value = self.admin_key.get_secret_value()
            if len(value) < 24 or value.lower() in {"changeme", "secret", "admin", "password"}:
                raise ValueError("BASTION_ADMIN_KEY is a placeholder or too short for production")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'bastion.db'}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin.key"

    @property
    def resolved_audit_signing_key_file(self) -> Path:
        return self.audit_signing_key_file or self.data_dir / "audit-signing.pem"

    @property
    def resolved_audit_kek_file(self) -> Path:
        return self.audit_kek_file or self.data_dir / "audit.kek"

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ValueError("BASTION_REDIS_URL is not set (bastion up sets it for its children)")
        return self.redis_url

    def to_env(self) -> dict[str, str]:
        """The settings as ``BASTION_*`` variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"BASTION_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env
