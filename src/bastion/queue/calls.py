"""Typed builders of the queue scripts' KEYS and ARGV: each script's argument order lives here
and in the script's own header comment, nowhere else.

Every process that calls a script (the gateway's producer, the worker's consumer, the control
plane's evaluations and dead-letter replays) builds the call here from an ``Envelope`` or a
``Job``, so a new envelope field or script argument is one change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.constants import (
    CONSUMER_GROUP,
    IDEMPOTENCY_PREFIX,
    JOB_PREFIX,
    LANE_BATCH,
    SHADOW_RECORD_TTL_S,
    cost_key,
    dead_letter_key,
    inflight_key,
    job_key,
    key_bucket_key,
    queue_key,
    reply_key,
    shadow_job_key,
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

NO_KEY = "-"  # a key id for calls without one (its bucket key is never given a budget)
NO_RECORD = f"{IDEMPOTENCY_PREFIX}-"  # the record slot of a call without an Idempotency-Key (never written)
IDEMPOTENCY_TTL_S = 86_400

Call = tuple[list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class Pricing:
    """How admission prices a row before a version's cost is measured, and the lowest price."""

    default_per_row: float = 0.1
    floor_per_row: float = 0.01


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


def state_key(job: Envelope) -> str:
    """Where a job's outcome is kept: ``job:{id}``, or ``sj:{id}`` for a shadow copy (no tenant
    route reads that prefix)."""
    return shadow_job_key(job.job_id) if job.role == "shadow" else job_key(job.job_id)


def enqueue(env: Envelope, admit: Admit) -> Call:
    limits = admit.limits
    keys = [
        queue_key(env.model, env.lane),
        job_key(env.job_id),
        tenant_bucket_key(env.tenant, env.model),
        key_bucket_key(env.key_id or NO_KEY),
        inflight_key(env.tenant),
        cost_key(env.model, env.version),
        admit.idempotency[0] if admit.idempotency else NO_RECORD,
    ]
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
        *env.fields(),
    ]
    return keys, args


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
) -> Call:
    """Store the outcome, reply, acknowledge. A shadow copy's record keeps no outputs, lives
    ``SHADOW_RECORD_TTL_S`` and is never copied to the dead-letter stream (it answers nobody)."""
    shadow = job.role == "shadow"
    if shadow:
        dead_reason = ""
        ttl_s = min(ttl_s, SHADOW_RECORD_TTL_S)
    keys = [
        state_key(job),
        job.stream,
        reply_key(job.reply_to or "none"),
        dead_letter_key(job.model),
        inflight_key(job.tenant) if job.counted else "",
        job.idempotency,
    ]
    extra: list[Any] = []
    if dead_reason:
        for k, v in job.raw.items():
            extra += [k, v]
        extra += [b"entry", job.entry_id]
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
        *extra,
    ]
    return keys, args


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
    """Mark an async job running (``started_ms`` None: only name the ``pid`` now running it)."""
    return [job_key(job.job_id)], [worker, "" if started_ms is None else started_ms, pid]


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


def prune(stream: str, idle_ms: int, keep: str) -> Call:
    return [stream], [CONSUMER_GROUP, idle_ms, keep]


def replay(model: str, entry_id: str, state_ttl_s: int) -> Call:
    return [dead_letter_key(model), queue_key(model, LANE_BATCH)], [entry_id, state_ttl_s, JOB_PREFIX]
