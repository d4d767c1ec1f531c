"""Typed builders of the queue scripts' KEYS and ARGV: each script's argument order lives here
and in the script's own header comment, nowhere else.

Every process that calls a script (the gateway's producer, the worker's consumer, the control
plane's evaluations and dead-letter replays) builds the call here from an ``Envelope`` or a
``Job``, so a new envelope field or script argument is one change in one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from bastion.constants import (
    AUDIT_STREAM,
    CONSUMER_GROUP,
    EVALUATION_TENANT,
    IDEMPOTENCY_PREFIX,
    JOB_EVENTS_CHANNEL,
    JOB_PREFIX,
    KEY_REQUESTS_PREFIX,
    KEY_TOKENS_PREFIX,
    LANE_BATCH,
    SHADOW_RECORD_TTL_S,
    TENANT_REQUESTS_PREFIX,
    TENANT_TOKENS_PREFIX,
    cost_key,
    dead_letter_key,
    inflight_key,
    job_key,
    key_bucket_key,
    queue_key,
    reply_key,
    shadow_job_key,
    stored_keys,
    tenant_bucket_key,
)
from bastion.queue.envelope import Envelope, Job
from bastion.queue.scripts import Lua
from bastion.snapshot import Limits

ENQUEUE = Lua("enqueue")
COMPLETE = Lua("complete", prelude="outcome")
ABANDON = Lua("abandon", prelude="outcome")
SETTLE = Lua("settle")
START = Lua("start")
PRUNE = Lua("prune")
REPLAY = Lua("replay")
CACHED = Lua("cached")

# Text jobs' buckets (enqueue.lua takes, settle.lua gives tokens back; TTL: time to refill).

NO_KEY = "-"  # a key id for calls without one (its bucket key is never given a budget)
NO_RECORD = f"{IDEMPOTENCY_PREFIX}-"  # the record slot of a call without an Idempotency-Key (never written)
IDEMPOTENCY_TTL_S = 86_400

Call = tuple[list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class Pricing:
    """How admission prices a row before a version's cost is measured, and the lowest price."""

    default_per_row: float = 0.1
    floor_per_row: float = 0.01


@dataclass(frozen=True, slots=True)
class Storage:
    """How many async job results (queued ones count) and how many bytes of them one tenant may
    hold at once (``settings.max_stored_results`` / ``max_stored_result_bytes``)."""

    max_results: int = 10_000
    max_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class DeadLetters:
    """How many dead letters a model keeps, for how long, and the largest input a letter copies
    (a larger one keeps only its size and digest, and cannot be replayed)."""

    max_count: int = 1000
    max_age_s: int = 7 * 86_400
    max_input_bytes: int = 64 << 10


# Fields a dead letter whose input was not copied carries instead (replay.lua reads the mark).
LETTER_INPUT_BYTES = b"input_bytes"
LETTER_INPUT_SHA256 = b"input_sha256"
LETTER_REPLAYABLE = b"replayable"


@dataclass(slots=True)  # one per request: not frozen, whose __init__ is slower
class Admit:
    """What enqueue.lua checks and takes for one envelope."""

    max_queue: int
    keep_state: bool  # create the tenant-readable job state hash (async jobs)
    state_ttl_s: int
    limits: Limits
    pricing: Pricing
    slot_ms: int  # how long the job's in-flight slot lives if its outcome never gives it back
    idempotency: tuple[str, str] | None = None  # (record key, request fingerprint) of an Idempotency-Key
    idempotency_ttl_s: int = IDEMPOTENCY_TTL_S
    storage: Storage | None = None  # the tenant's stored-result ledger applies (async jobs of a tenant)
    tokens: int = 0  # text tokens to reserve (prompt + max_tokens); 0: not a text job, no token bucket


def state_key(job: Envelope) -> str:
    """Where a job's outcome is kept: ``job:{id}``, or ``sj:{id}`` for a shadow copy (no tenant
    route reads that prefix)."""
    return shadow_job_key(job.job_id) if job.role == "shadow" else job_key(job.job_id)


def in_ledger(job: Envelope) -> bool:
    """Whether a job's result counts against its tenant's stored-result ledger and its status
    changes are announced on ``jobs:events``: an async job a tenant asked for (batch lane; not a
    shadow copy or an evaluation)."""
    return (
        job.lane == LANE_BATCH
        and not job.reply_to
        and job.role not in ("shadow", "evaluation")
        and job.tenant != EVALUATION_TENANT
    )


def enqueue(env: Envelope, admit: Admit) -> Call:
    limits = admit.limits
    storage = admit.storage
    keys = [
        queue_key(env.model, env.lane),
        job_key(env.job_id),
        tenant_bucket_key(env.tenant, env.model),
        key_bucket_key(env.key_id or NO_KEY),
        inflight_key(env.tenant),
        cost_key(env.model, env.version),
        admit.idempotency[0] if admit.idempotency else NO_RECORD,
    ]
    if storage is not None:
        keys += stored_keys(env.tenant)
    tokens = admit.tokens
    args: list[Any] = [
        admit.max_queue,
        "1" if admit.keep_state else "0",
        admit.state_ttl_s,
        env.tenant,
        env.model,
        env.created_ms,
        env.rows,
        limits.tenant_rate,
        limits.tenant_burst,
        limits.key_rate,
        limits.key_burst,
        limits.max_concurrency,
        admit.pricing.default_per_row,
        admit.pricing.floor_per_row,
        admit.idempotency[1] if admit.idempotency else "",
        admit.idempotency_ttl_s,
        env.job_id,
        admit.slot_ms,
        env.version,
        storage.max_results if storage is not None else 0,
        storage.max_bytes if storage is not None else 0,
        *env.fields(),
    ]
    if tokens > 0:  # a text job: its buckets, its tokens and their limits (ARGV[22..30])
        keys += text_bucket_keys(env.tenant, env.model, env.key_id)
        args[21:21] = _text_args(tokens, limits)
    return keys, args


def text_bucket_keys(tenant: str, model: str, key_id: str) -> list[str]:
    """The token and request buckets of a text job: the tenant's for the model, then the key's."""
    key = key_id or NO_KEY
    return [
        f"{TENANT_TOKENS_PREFIX}{tenant}:{model}",
        f"{TENANT_REQUESTS_PREFIX}{tenant}:{model}",
        f"{KEY_TOKENS_PREFIX}{key}",
        f"{KEY_REQUESTS_PREFIX}{key}",
    ]


def _text_args(tokens: int, limits: Limits) -> tuple[Any, ...]:
    return (
        tokens,
        limits.tenant_tokens_per_min,
        limits.tenant_tokens_burst,
        limits.tenant_requests_per_min,
        limits.tenant_requests_burst,
        limits.key_tokens_per_min,
        limits.key_tokens_burst,
        limits.key_requests_per_min,
        limits.key_requests_burst,
    )


def complete(
    job: Job,
    status: str,
    result: bytes,
    error: str,
    *,
    ttl_s: int,
    finished_ms: int,
    reply_cap: int,
    dead_reason: str = "",
    letters: DeadLetters = DeadLetters(),
    max_stored_bytes: int = 0,
    decision: bytes = b"",
) -> Call:
    """Store the outcome, reply, acknowledge. A shadow copy's record keeps no outputs, lives
    ``SHADOW_RECORD_TTL_S`` and is never copied to the dead-letter stream (it answers nobody).
    A tenant's async job (``in_ledger``) records its result's size in the tenant's ledger and
    announces its outcome on ``jobs:events``; a result that would take the tenant's stored bytes
    past ``max_stored_bytes`` (0: no bound) is not kept: the job fails with the reason.
    ``decision`` (the job's decision-log event, ``bastion.queue.decisions``; b"": none) is
    appended to the audit stream if this call stores a success, with the inputs when kept."""
    shadow = job.role == "shadow"
    if shadow:
        dead_reason = ""
        ttl_s = min(ttl_s, SHADOW_RECORD_TTL_S)
    ledger = in_ledger(job)
    keys = [
        state_key(job),
        job.stream,
        reply_key(job.reply_to or "none"),
        dead_letter_key(job.model),
        inflight_key(job.tenant) if job.counted else "",
        job.idempotency,
        *(stored_keys(job.tenant) if ledger else ("", "")),
        AUDIT_STREAM if decision and not shadow else "",
    ]
    extra: list[Any] = []
    if dead_reason:
        extra = letter_fields(job, letters.max_input_bytes)
    args: list[Any] = [
        job.entry_id,
        CONSUMER_GROUP,
        status,
        b"" if shadow else result,
        error,
        ttl_s,
        job.job_id,
        "0" if job.is_async else "1",
        reply_cap,
        job.tenant,
        job.model,
        finished_ms,
        dead_reason,
        result,
        JOB_EVENTS_CHANNEL if ledger else "",
        letters.max_count,
        letters.max_age_s * 1000,
        max_stored_bytes if ledger else 0,
        decision if not shadow else b"",
        job.blob if decision and job.retain and not shadow else b"",
        *extra,
    ]
    return keys, args


def cached(entry: str, job: Envelope, decision: bytes) -> Call:
    """Read a response-cache entry for ``job``; a hit logs ``decision`` (b"": the log is off)."""
    if not decision:
        return [entry, ""], [b"", b""]
    return [entry, AUDIT_STREAM], [decision, job.blob if job.retain else b""]


def letter_fields(job: Job, max_input_bytes: int) -> list[Any]:
    """A dead letter's fields: the job's original entry, and where it came from. An input over
    ``max_input_bytes`` is not copied: the letter keeps its size and SHA-256 and is marked not
    replayable."""
    found: list[Any] = []
    for k, v in job.raw.items():
        if k == b"x" and len(v) > max_input_bytes:
            digest = hashlib.sha256(v).hexdigest()
            found += [LETTER_INPUT_BYTES, len(v), LETTER_INPUT_SHA256, digest, LETTER_REPLAYABLE, b"0"]
        else:
            found += [k, v]
    return [*found, b"entry", job.entry_id]


def abandon(
    job_id: str,
    tenant: str,
    model: str,
    error: str,
    *,
    ttl_s: int,
    finished_ms: int,
    idempotency: str = "",
    counted: bool = False,
) -> Call:
    """Store 'expired' for a sync job its caller stopped waiting for (``counted``: it holds an
    in-flight slot, given back with the outcome)."""
    keys = [job_key(job_id), inflight_key(tenant) if counted else "", idempotency]
    return keys, [job_id, tenant, model, error, ttl_s, finished_ms]


def start(job: Job, worker: str, started_ms: int | None, pid: int) -> Call:
    """Mark an async job running (``started_ms`` None: only name the ``pid`` now running it); a
    tenant's job is announced on ``jobs:events``."""
    channel = JOB_EVENTS_CHANNEL if in_ledger(job) else ""
    return [job_key(job.job_id)], [worker, "" if started_ms is None else started_ms, pid, channel, job.job_id]


def settle(
    tenant: str,
    key_id: str,
    model: str,
    version: int,
    *,
    reserved: float,
    measured_reserved: float,
    measured_ran: float,
    rows_ran: int,
    floor_per_row: float,
) -> Call:
    keys = [tenant_bucket_key(tenant, model), key_bucket_key(key_id or NO_KEY), cost_key(model, version)]
    return keys, [reserved, measured_reserved, measured_ran, rows_ran, floor_per_row]


def settle_text(job: Job, used_tokens: int) -> Call | None:
    """Give back the tokens a text job reserved and did not use to its token buckets (settle.lua,
    which learns nothing with 0 rows); None when there is nothing to give back."""
    unused = job.tokens - max(used_tokens, 0)
    if job.tokens <= 0 or unused <= 0:
        return None
    tenant_tokens, _, key_tokens, _ = text_bucket_keys(job.tenant, job.model, job.key_id)
    return [tenant_tokens, key_tokens, ""], [job.tokens, job.tokens - unused, 0, 0, 0]


def settle_tokens(client: Any, job: Job, used_tokens: int) -> None:
    """Give back ``job.tokens - used_tokens`` to the job's token buckets (sync client; the worker's
    call, once per finished generation, cancelled ones included). A bucket is never filled above
    its burst, one that expired (full again) is left alone, and nothing is ever taken: a job that
    used more than it reserved (it cannot, ``max_tokens`` bounds it) settles as having used all."""
    call = settle_text(job, used_tokens)
    if call is not None:
        SETTLE.call(client, *call)


def prune(stream: str, idle_ms: int, keep: str) -> Call:
    return [stream], [CONSUMER_GROUP, idle_ms, keep]


def replay(model: str, entry_id: str, state_ttl_s: int) -> Call:
    return [dead_letter_key(model), queue_key(model, LANE_BATCH)], [entry_id, state_ttl_s, JOB_PREFIX]
