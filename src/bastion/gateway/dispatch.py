"""Resolve a model, queue a job and (for sync calls) await its reply until the deadline."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from redis.exceptions import RedisError

from bastion import codec, logs, metrics, routing
from bastion.constants import LANE_BATCH, LANE_SYNC, STATUS_EXPIRED, STATUS_SUCCEEDED
from bastion.errors import DeadlineExceeded, InvalidInput, JobFailed, NotFound, Unavailable
from bastion.gateway import idempotency, response_cache
from bastion.gateway.breakers import Outcome, Permit
from bastion.gateway.idempotency import Idempotency
from bastion.gateway.replies import Reply
from bastion.gateway.state import GatewayState
from bastion.queue.producer import Admission, ratelimit_fields, refill_seconds
from bastion.snapshot import DEFAULT_SERVING, KeyInfo, Limits, Serving, VersionInfo

log = logs.get("bastion.gateway")


def resolve(state: GatewayState, name: str, subject: str, key: KeyInfo) -> tuple[VersionInfo, bool]:
    """The version that answers this caller and subject for ``name`` now, and whether it is the fallback."""
    if len(name) > 64:
        raise NotFound("no such model")
    routes = state.snapshots.current.models.get(name)
    return routing.choose(name, routes, subject, key.tenant, key.jurisdiction, key.consents)


@dataclass(frozen=True, slots=True)
class Choice:
    """The version that answers a request, why (``fallback``: 'disabled', 'circuit-open' or ''),
    and the breaker permit to hand back with the call's outcome."""

    version: VersionInfo
    fallback: str
    permit: Permit


def route(state: GatewayState, name: str, subject: str, key: KeyInfo) -> Choice:
    """``resolve`` through the version's circuit breaker: an open one sends the call to the
    fallback, or to the primary when a canary is failing (each only when policy lets this caller
    reach it and its own breaker lets the call through), or refuses it at once with 503."""
    version, fallback = resolve(state, name, subject, key)
    breakers = state.breakers
    now = time.monotonic()
    breaker = breakers.get(version.model, version.version)
    permit = breaker.allow(now)
    if permit is not None:
        return Choice(version, "disabled" if fallback else "", permit)
    routes = state.snapshots.current.models[name]
    for alternative in routing.alternatives(routes, version.version, key.tenant, key.jurisdiction, key.consents):
        other = breakers.get(alternative.model, alternative.version).allow(now)
        if other is not None:
            metrics.BREAKER_DIVERTED.labels(version.model, str(version.version), "fallback").inc()
            return Choice(alternative, "circuit-open", other)
    metrics.BREAKER_DIVERTED.labels(version.model, str(version.version), "refused").inc()
    raise Unavailable(
        f"model {name!r} version {version.version} is failing (circuit open) and no fallback can answer; "
        f"retry in {breaker.retry_after(now)} s",
        retry_after=breaker.retry_after(now),
        model=name,
    )


class Call:
    """Set ``ignored`` when the answer did not come from the version now (a cached answer, an
    Idempotency-Key replay): it says nothing about the version's health."""

    __slots__ = ("ignored",)

    def __init__(self) -> None:
        self.ignored = False


@contextlib.contextmanager
def breaker_call(state: GatewayState, permit: Permit) -> Iterator[Call]:
    """Hand the permit back with what happened: the worker failed, the deadline passed, it
    answered - or it was refused before running (not the version's fault: not counted)."""
    outcome = Outcome.IGNORED
    call = Call()
    try:
        yield call
        outcome = Outcome.IGNORED if call.ignored else Outcome.OK
    except JobFailed:
        outcome = Outcome.FAILED
        raise
    except DeadlineExceeded:
        outcome = Outcome.TIMEOUT
        raise
    finally:
        state.breakers.record(permit, outcome)


def subject_of(header: str | None, tenant: str) -> str:
    """The routing subject: the client's ``X-Bastion-Subject``, else its tenant."""
    if header is None:
        return tenant
    if not 0 < len(header) <= 256:
        raise InvalidInput("X-Bastion-Subject must be 1 to 256 characters")
    return f"{tenant}\x00{header}"


def new_job_id() -> str:
    """An unguessable id for a job a client will hold on to (async jobs)."""
    return secrets.token_urlsafe(16)


def serving_of(state: GatewayState, model: str) -> Serving:
    routes = state.snapshots.current.models.get(model)
    return routes.serving if routes is not None else DEFAULT_SERVING


def timeout_s(state: GatewayState, header: str | None, model: str = "") -> float:
    """The caller's deadline (``X-Bastion-Timeout-Ms``), else the model's default, within the limit."""
    limit = state.settings.request_timeout_s
    if header is None:
        default = serving_of(state, model).timeout_s if model else None
        return min(default, limit) if default else limit
    try:
        millis = float(header)
    except ValueError as exc:
        raise InvalidInput("X-Bastion-Timeout-Ms must be a number of milliseconds") from exc
    if not 1 <= millis <= limit * 1000:
        raise InvalidInput(f"X-Bastion-Timeout-Ms must be between 1 and {int(limit * 1000)}")
    return millis / 1000


@asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:  # unreachable, or refusing writes (OOM, READONLY)
        metrics.ERRORS.labels("gateway", "redis_unavailable").inc()
        raise Unavailable("the job queue is unavailable; retry shortly", retry_after=1) from exc


def rows_of(tensors: dict[str, np.ndarray]) -> int:
    return max((len(t) for t in tensors.values() if t.ndim), default=1)


def ratelimit_headers(limits: Limits, admission: Admission) -> dict[str, str]:
    """IETF ``RateLimit`` / ``RateLimit-Policy`` for the tighter of the caller's budgets (none: {})."""
    found = [
        (left, burst, rate, name)
        for left, burst, rate, name in (
            (admission.tenant_left, limits.tenant_burst, limits.tenant_rate, "tenant-model"),
            (admission.key_left, limits.key_burst, limits.key_rate, "key"),
        )
        if left is not None
    ]
    if not found:
        return {}
    left, burst, rate, name = min(found)
    return ratelimit_fields(name, left, burst, rate, refill_seconds(burst - left, rate))


async def run_sync(
    state: GatewayState,
    key: KeyInfo,
    version: VersionInfo,
    tensors: dict[str, np.ndarray],
    wait_s: float,
    idem: Idempotency | None = None,
) -> tuple[str, dict[str, np.ndarray], Admission]:
    """Admit and queue on the sync lane, await the reply; returns (job id, outputs, admission).

    With an ``Idempotency-Key`` already used for this request, nothing is queued: the first
    request's outcome is returned (``admission.replayed_job`` says so). With the model's response
    cache on, an answer cached for this tenant, version and input is returned before admission
    (``admission.cached``): it costs no compute, so it takes nothing from the budgets."""
    job_id = own_id = state.replies.new_id()
    serving = serving_of(state, version.model)
    blob = codec.encode(tensors)
    cached_at = None
    if serving.cache_ttl_s and idem is None:
        cached_at = response_cache.key_for(key.tenant, version, blob)
        async with redis_errors():
            hit = await state.redis.get(cached_at)
        if hit is not None:
            metrics.CACHE.labels(version.model, "hit").inc()
            return job_id, codec.decode(hit), Admission(0.0, None, None, cached=True)
        metrics.CACHE.labels(version.model, "miss").inc()
    deadline_ms = int((time.time() + wait_s) * 1000)
    future = state.replies.expect(own_id)
    metrics.INFLIGHT_SYNC.inc()
    try:
        async with redis_errors():
            admission = await state.producer.enqueue(
                lane=LANE_SYNC,
                job_id=job_id,
                tenant=key.tenant,
                model=version.model,
                version=version.version,
                blob=blob,
                deadline_ms=deadline_ms,
                reply_to=state.gateway_id,
                rows=rows_of(tensors),
                key_id=key.id,
                limits=key.limits,
                idempotency=idem.pair if idem else None,
                max_queue=serving.max_queue_sync,
            )
        if admission.replayed_job is not None and idem is not None:
            job_id = admission.replayed_job
            async with redis_errors():
                reply = await idempotency.replay(state.redis, idem, job_id, wait_s)
        else:
            try:
                reply = await _await_reply(future, wait_s, job_id)
            except DeadlineExceeded:
                await _abandon(state, key, version, job_id, admission.counted)
                if idem is not None:
                    with contextlib.suppress(RedisError, OSError):
                        await state.redis.delete(idem.redis_key)
                raise
            if idem is not None:
                async with redis_errors():
                    await idempotency.record(state.redis, idem, reply)
    finally:
        state.replies.forget(own_id)
        metrics.INFLIGHT_SYNC.dec()
    if reply.status == STATUS_SUCCEEDED:
        if cached_at is not None:
            with contextlib.suppress(RedisError, OSError):  # an answer not cached is still the answer
                await state.redis.set(cached_at, reply.blob, ex=serving.cache_ttl_s)
        return job_id, codec.decode(reply.blob), admission
    if reply.status == STATUS_EXPIRED:
        raise DeadlineExceeded(reply.error or "the deadline passed before the job ran", job_id=job_id)
    raise JobFailed(reply.error or f"the job ended with status {reply.status}", job_id=job_id)


def copy_to_shadows(
    state: GatewayState,
    key: KeyInfo,
    name: str,
    subject: str,
    job_id: str,
    tensors: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
) -> None:
    """Queue a copy of an answered request for each shadow route (batch lane; never answers).

    The copy carries the answer, so the worker can compare without a second lookup. Called after
    the answer is ready and not awaited: a shadow can neither delay nor change a response.
    """
    routes = state.snapshots.current.models.get(name)
    if routes is None or not routes.shadows:
        return
    answer = codec.encode(outputs)
    blob = codec.encode(tensors)
    for route in routes.shadows:
        if routing.shadowed(name, route, subject):
            state.spawn(
                _enqueue_shadow(state, key, route.version, f"{job_id}-shadow{route.version.version}", blob, answer)
            )


async def _enqueue_shadow(
    state: GatewayState, key: KeyInfo, version: VersionInfo, job_id: str, blob: bytes, answer: bytes
) -> None:
    try:
        await state.producer.enqueue(
            lane=LANE_BATCH,
            job_id=job_id,
            tenant=key.tenant,
            model=version.model,
            version=version.version,
            blob=blob,
            compare=answer,
        )
    except Exception as exc:  # a lost shadow copy costs a comparison, never a response
        metrics.ERRORS.labels("gateway", "shadow_enqueue").inc()
        log.warning(
            "shadow_enqueue_failed", model=version.model, version=version.version, error_type=type(exc).__name__
        )


async def _abandon(state: GatewayState, key: KeyInfo, version: VersionInfo, job_id: str, counted: bool) -> None:
    """Store 'expired' as the job's outcome, so a late worker result is never shown for it."""
    with contextlib.suppress(RedisError, OSError):  # the 504 stands; a late result then stays unseen
        await state.producer.abandon(
            job_id=job_id,
            tenant=key.tenant,
            model=version.model,
            error="the caller's deadline passed before a result arrived",
            ttl_s=state.settings.sync_result_ttl_s,
            counted=counted,
        )


async def _await_reply(future: asyncio.Future[Reply], wait_s: float, job_id: str) -> Reply:
    """Await the reply; a timer that cancels the future is cheaper than ``asyncio.wait_for``."""
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        future.cancel()

    timer = asyncio.get_running_loop().call_later(wait_s, expire)
    try:
        return await future
    except asyncio.CancelledError as exc:
        if expired:
            raise DeadlineExceeded(f"no result within {wait_s:.3g} s; the job was abandoned", job_id=job_id) from exc
        raise
    finally:
        timer.cancel()


async def submit_async(
    state: GatewayState,
    key: KeyInfo,
    version: VersionInfo,
    tensors: dict[str, np.ndarray],
    idem: Idempotency | None = None,
) -> tuple[str, Admission]:
    """Admit and queue on the batch lane; with a reused Idempotency-Key, the first job's id."""
    job_id = new_job_id()
    async with redis_errors():
        admission = await state.producer.enqueue(
            lane=LANE_BATCH,
            job_id=job_id,
            tenant=key.tenant,
            model=version.model,
            version=version.version,
            blob=codec.encode(tensors),
            rows=rows_of(tensors),
            key_id=key.id,
            limits=key.limits,
            idempotency=idem.pair if idem else None,
            max_queue=serving_of(state, version.model).max_queue_batch,
        )
    return admission.replayed_job or job_id, admission
