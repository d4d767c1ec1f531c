"""The one path behind every prediction front door: authenticate, route, read, breaker, admit,
await, respond - each step recording its decision on the call context (``gateway.context``).

With tracing on, the request's server span (``bastion.tracing``, started around the request by
the HTTP middleware or the gRPC service) is the call's ``span``: the steps add events to it
(``authenticated``, ``enqueued`` - admission and the queue are one script -, ``replied``,
``cache_hit``) and the job carries its ``traceparent``. With tracing off, each of those is one
``is None`` check.

Order matters for safety: an unauthenticated or misdirected request never has its body read,
and the circuit breaker's permit is taken only once the body is in and parsed, with its clock
started at enqueue, so a client that uploads slowly is timed as a client, never as the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError
from starlette.requests import Request

from bastion import codec, logs, metrics, routing, tracing
from bastion.constants import (
    LANE_BATCH,
    LANE_SHADOW,
    LANE_SYNC,
    SHADOW_RECORD_TTL_S,
    STATUS_EXPIRED,
    STATUS_SUCCEEDED,
    TERMINAL_STATUSES,
    job_key,
)
from bastion.errors import BastionError, DeadlineExceeded, InvalidInput, JobFailed, NotFound, Unavailable
from bastion.gateway import idempotency, response_cache
from bastion.gateway.auth import authenticate_header
from bastion.gateway.breakers import Outcome, Permit
from bastion.gateway.context import Call
from bastion.gateway.inbound import Inbound
from bastion.gateway.replies import Reply
from bastion.gateway.state import GatewayState
from bastion.queue import calls, decisions
from bastion.queue.calls import Storage
from bastion.queue.envelope import ROLE_FALLBACK, ROLE_SHADOW
from bastion.queue.producer import (
    UNLIMITED,
    Admission,
    join_ratelimit_fields,
    ratelimit_fields,
    refill_seconds,
    text_ratelimit_fields,
)
from bastion.snapshot import DEFAULT_SERVING, Limits, Serving, VersionInfo

log = logs.get("bastion.gateway")

MAX_NAME = 64
PROBE_POLL_S = 0.05
PROBE_QUEUED_S = 0.5  # an async probe not started by then goes back unjudged
STORE_FULL_RETRY_S = 5  # Retry-After when Redis refuses writes for want of memory


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


# steps ------------------------------------------------------------------------------------
def route(state: GatewayState, call: Call, name: str, version: int | None = None) -> None:
    """Which version answers this caller for model ``name`` now, and why (policy, weights, kill
    switch), or the ``version`` the caller named if it may reach it; the breaker may still divert
    a call it did not name the version of (``take_permit``)."""
    if len(name) > MAX_NAME:
        raise NotFound("no such model")
    key = call.key
    routes = state.snapshots.current.models.get(name)
    if version is None:
        routed = routing.choose(name, routes, call.subject, key.tenant, key.jurisdiction, key.consents)
    else:
        routed = routing.choose_version(name, routes, version, key.tenant, key.jurisdiction, key.consents)
        call.pinned = True
    call.model = name
    call.version, call.role, call.reason = routed.version, routed.role, routed.reason
    call.rule, call.allowed = routed.rule, routed.allowed
    logs.bind(tenant=key.tenant, model=name, version=routed.version.version)


def take_permit(state: GatewayState, call: Call) -> None:
    """Pass the chosen version's circuit breaker: an open one sends the call to the fallback, or
    to the primary when a canary is failing (each only when policy lets this caller reach it and
    its own breaker lets the call through), or refuses it at once with 503."""
    version = call.chosen
    breakers = state.breakers
    now = time.monotonic()
    breaker = breakers.get(version.model, version.version)
    permit = breaker.allow(now)
    if permit is not None:
        call.permit = permit
        return
    routes = state.snapshots.current.models.get(call.model)  # the snapshot may have moved on meanwhile
    if call.pinned:  # the caller named this version: no other may answer in its place
        routes = None
    for alternative in routing.alternatives(routes, version.version, call.allowed) if routes else ():
        other = breakers.get(alternative.model, alternative.version).allow(now)
        if other is not None:
            metrics.BREAKER_DIVERTED.labels(version.model, str(version.version), "fallback").inc()
            call.version, call.role, call.reason, call.permit = alternative, ROLE_FALLBACK, "circuit-open", other
            logs.bind(version=alternative.version)
            return
    metrics.BREAKER_DIVERTED.labels(version.model, str(version.version), "refused").inc()
    raise Unavailable(
        f"model {call.model!r} version {version.version} is failing (circuit open) and no fallback can answer; "
        f"retry in {breaker.retry_after(now)} s",
        retry_after=breaker.retry_after(now),
        model=call.model,
    )


async def begin(inbound: Inbound, scopes: tuple[str, ...]) -> tuple[GatewayState, Call, Any]:
    """Authenticate, route, then read and decode the body, then take the breaker's permit: the
    steps every prediction front door shares. Returns the state, the call and the decoded body."""
    state = inbound.state
    headers = inbound.headers
    call = Call(inbound.request_id, traceparent=headers.get("traceparent", ""))
    if tracing.ON:
        _join_trace(call, inbound)
    call.principal = await authenticate_header(headers.get("authorization"), state, scopes, inbound.on_key)
    call.choose_subject(headers.get("x-bastion-subject"))
    if call.span is not None:
        call.span.event("authenticated")
    if state.backlog is not None:
        state.backlog.check()  # no decision that could not be recorded
    routed_by = state.snapshots.current
    route(state, call, inbound.model, inbound.version)
    body = await inbound.read()
    if state.snapshots.current is not routed_by:  # a change (a rule, the kill switch) came meanwhile
        route(state, call, inbound.model, inbound.version)
    doc = inbound.decode(body, headers)
    call.idem = idempotency.from_request(headers.get("idempotency-key"), call.key.tenant, inbound.path, body)
    take_permit(state, call)
    if call.span is not None:
        _describe(call.span, call)
    return state, call, doc


def _join_trace(call: Call, inbound: Inbound) -> None:
    """Make the request's server span the call's: the job continues its trace."""
    span = tracing.current()
    if span is None:
        return
    call.span = span
    call.traceparent = span.traceparent
    span.attributes["bastion.model"] = inbound.model[:MAX_NAME]


def _describe(span: tracing.Span, call: Call) -> None:
    """What routing decided, on the span (ids only: never a subject or an input)."""
    version = call.chosen
    attributes = span.attributes
    attributes["bastion.tenant"] = call.key.tenant
    attributes["bastion.version"] = version.version
    attributes["bastion.role"] = call.role
    if call.reason:
        attributes["bastion.fallback_reason"] = call.reason


@contextlib.contextmanager
def breaker_call(state: GatewayState, call: Call, *, timed: bool = True) -> Iterator[None]:
    """Hand the permit back with what happened: the worker failed, the deadline passed, it
    answered - or it was refused before running, or answered without running (a cached answer,
    an Idempotency-Key replay, whatever that replay says): not the version's doing, not counted.
    ``timed=False``: an answer's time says nothing of the version's health (a whole generation
    takes as long as the tokens asked for), so an answer is never slow; failures still count."""
    outcome = Outcome.IGNORED
    try:
        yield
        outcome = Outcome.OK
    except JobFailed:
        outcome = Outcome.FAILED
        raise
    except DeadlineExceeded:
        outcome = Outcome.TIMEOUT
        raise
    finally:
        admission = call.admission
        if admission is None or admission.cached or admission.replayed_job is not None:
            outcome = Outcome.IGNORED  # nothing ran on the version now
        state.breakers.record(call.permit, outcome, None if timed or outcome is not Outcome.OK else 0.0)


def new_job_id() -> str:
    """An unguessable id for a job a client will hold on to (async jobs, shadow copies)."""
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
    """Redis failures as 503 problems: out of memory (``maxmemory`` reached, ``noeviction``: it
    refuses writes) says the job store is full; anything else (unreachable, READONLY) that the
    queue is unavailable."""
    try:
        yield
    except (RedisError, OSError) as exc:
        if isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM")):
            metrics.ERRORS.labels("gateway", "redis_full").inc()
            raise Unavailable("the job store is full; retry later", retry_after=STORE_FULL_RETRY_S) from exc
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


def response_headers(call: Call) -> dict[str, str]:
    """Which version answered, whether (and why) it was the fallback, and what is left of the
    caller's budget."""
    headers = {"X-Bastion-Model-Version": str(call.chosen.version)}
    if call.role == ROLE_FALLBACK:
        headers["X-Bastion-Fallback"] = "true"
        headers["X-Bastion-Fallback-Reason"] = call.reason
    admission = call.admission
    if admission is not None:
        if admission.replayed_job is not None:
            headers["Idempotent-Replayed"] = "true"
        if admission.cached:
            headers["X-Bastion-Cache"] = "hit"
        fields = {}
        if admission.tenant_left is not None or admission.key_left is not None:
            fields = ratelimit_headers(call.key.limits, admission)
        if admission.tokens:  # a text job: its token and request buckets too
            fields = join_ratelimit_fields(fields, text_ratelimit_fields(call.key.limits, admission))
        headers.update(fields)
    return headers


# sync -------------------------------------------------------------------------------------
class Queued:
    """A sync job admitted and queued, its reply awaited by ``outcome`` (``close`` always, after).

    ``run_sync`` awaits it at once; a streaming front door relays the job's chunks meanwhile and
    learns from ``future`` whether the job ended without them (failed, expired)."""

    __slots__ = ("call", "closed", "env", "future", "own_id", "state", "wait_s", "waited_until")

    def __init__(self, state: GatewayState, call: Call, env: Any, own_id: str, wait_s: float, until: float) -> None:
        self.state, self.call, self.env, self.own_id = state, call, env, own_id
        self.wait_s, self.waited_until = wait_s, until
        self.future: asyncio.Future[Reply] = state.replies.expect(own_id)
        self.closed = False
        metrics.INFLIGHT_SYNC.inc()

    @property
    def left_s(self) -> float:
        return max(0.001, self.waited_until - time.monotonic())

    async def outcome(self) -> Reply:
        """The job's reply: the first request's under a reused Idempotency-Key; the one the worker
        stored if it crossed the deadline; else ``DeadlineExceeded`` (the job abandoned)."""
        call, admission = self.call, self.call.admission
        if admission is not None and admission.replayed_job is not None and call.idem is not None:
            async with redis_errors():
                return await idempotency.replay(self.state.redis, call.idem, admission.replayed_job, self.left_s)
        try:
            return await _await_reply(self.future, self.left_s, self.own_id, self.wait_s)
        except DeadlineExceeded:
            late = await self.abandon()
            if late is None:
                raise
            return late

    async def abandon(self) -> Reply | None:
        """Give up on the job (its deadline passed): see ``_abandon``."""
        admission = self.call.admission
        return await _abandon(self.state, self.env, admission.counted if admission is not None else False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.state.replies.forget(self.own_id)
            metrics.INFLIGHT_SYNC.dec()


async def start_sync(
    state: GatewayState,
    call: Call,
    blob: bytes,
    wait_s: float,
    *,
    tokens: int = 0,
    generation: dict[str, Any] | None = None,
) -> Queued:
    """Admit and queue an encoded job on the sync lane (``tokens``: the text tokens to reserve;
    ``generation``: a generation job's ``gen`` member). The caller awaits ``outcome()`` and
    ``close()``s it; on an admission error it is closed already."""
    waited_until = time.monotonic() + wait_s  # the enqueue's own time comes out of the wait
    own_id = state.replies.new_id()
    call.job_id = own_id
    serving = serving_of(state, call.chosen.model)
    deadline_ms = int((time.time() + wait_s) * 1000)
    env = call.envelope(LANE_SYNC, own_id, blob, deadline_ms=deadline_ms, reply_to=state.gateway_id)
    if generation:
        env.generation = generation
    queued = Queued(state, call, env, own_id, wait_s, waited_until)
    try:
        if call.permit is not None:
            call.permit.started = time.monotonic()  # the breaker times the model, not the upload
        async with redis_errors():
            admission = await state.producer.enqueue(
                env,
                limits=call.key.limits,
                idempotency=call.idem.pair if call.idem else None,
                max_queue=serving.max_queue_sync,
                tokens=tokens,
            )
    except BaseException:
        queued.close()
        raise
    call.admission = admission
    if admission.replayed_job is not None:
        call.job_id = admission.replayed_job
    if call.span is not None:
        _enqueued(call.span, call, admission)
    return queued


def reply_outputs(call: Call, reply: Reply) -> dict[str, Any]:
    """A job's outputs from its reply; ``DeadlineExceeded`` / ``JobFailed`` for the others."""
    if call.span is not None:
        call.span.event("replied", {"bastion.status": reply.status})
    if reply.status == STATUS_SUCCEEDED:
        return codec.decode(reply.blob)
    if reply.status == STATUS_EXPIRED:
        raise DeadlineExceeded(reply.error or "the deadline passed before the job ran", job_id=call.job_id)
    raise JobFailed(reply.error or f"the job ended with status {reply.status}", job_id=call.job_id)


async def run_sync(
    state: GatewayState,
    call: Call,
    tensors: dict[str, np.ndarray],
    wait_s: float,
    *,
    tokens: int = 0,
    generation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Admit and queue on the sync lane, await the reply; returns the outputs (``call.job_id``
    and ``call.admission`` say which job answered and what was reserved).

    With an ``Idempotency-Key`` already used for this request, nothing is queued: the first
    request's outcome is returned (``admission.replayed_job``); the worker that completes a job
    stores its outcome in the key's record, so that holds even when the gateway that waited for
    it is gone. With the model's response cache on, an answer cached for this tenant, version and
    input is returned before admission (``admission.cached``): it costs no compute, so it takes
    nothing from the budgets. A generation job (``generation``, its ``gen`` member) is never
    answered from the cache: its request is not in the input tensors, and sampling may differ."""
    version = call.chosen
    call.job_id = state.replies.new_id()
    serving = serving_of(state, version.model)
    blob = codec.encode(tensors)
    cached_at = None
    if serving.cache_ttl_s and call.idem is None and not generation:
        cached_at = response_cache.key_for(call.key.tenant, version, blob)
        hit = await _cached(state, call, cached_at, blob)
        if hit is not None:
            return hit
    queued = await start_sync(state, call, blob, wait_s, tokens=tokens, generation=generation)
    try:
        reply = await queued.outcome()
    finally:
        queued.close()
    outputs = reply_outputs(call, reply)
    if cached_at is not None:
        with contextlib.suppress(RedisError, OSError):  # an answer not cached is still the answer
            await state.redis.set(cached_at, reply.blob, ex=serving.cache_ttl_s)
    return outputs


async def _cached(state: GatewayState, call: Call, cached_at: str, blob: bytes) -> dict[str, Any] | None:
    """The answer cached for this tenant, version and input (its decision logged by the same
    script), or None."""
    version = call.chosen
    env = call.envelope(LANE_SYNC, call.job_id, blob)
    now_ms = int(time.time() * 1000)
    decision = b""
    if state.settings.decision_log:
        decision = decisions.event(env, version.sha256, now_ms, cache=True, latency_ms=0.0)
    async with redis_errors():
        hit = await calls.CACHED.acall(state.redis, *calls.cached(cached_at, env, decision))
    if hit is None:
        metrics.CACHE.labels(version.model, "miss").inc()
        return None
    metrics.CACHE.labels(version.model, "hit").inc()
    if call.span is not None:
        call.span.event("cache_hit")
    call.admission = Admission(0.0, None, None, cached=True)
    return codec.decode(hit)


def _enqueued(span: tracing.Span, call: Call, admission: Admission) -> None:
    """Admission and the queue (one script): the event, and the job's id on the span."""
    span.attributes["bastion.job_id"] = admission.replayed_job or call.job_id
    found: dict[str, tracing.Value] = {"bastion.cost_units": round(admission.cost, 3)}
    if admission.replayed_job is not None:
        found["bastion.replayed"] = True
    span.event("enqueued", found)


async def _abandon(state: GatewayState, env: Any, counted: bool) -> Reply | None:
    """Store 'expired' as the job's outcome (and drop its Idempotency-Key record, so a retry runs
    again), so a late worker result is never shown for it. When a worker stored the outcome
    first (its reply crossed the deadline), that outcome is the answer: the decision it logged
    is the one the caller gets. None: abandoned (or Redis away), the 504 stands."""
    try:
        stored = await state.producer.abandon(
            env, "the caller's deadline passed before a result arrived", state.settings.sync_result_ttl_s, counted
        )
        if stored:
            return None
        status, blob, error = await state.redis.hmget(job_key(env.job_id), "status", "result", "error")
    except (RedisError, OSError):  # the 504 stands; a late result then stays unseen
        return None
    if status is None:
        return None
    return Reply(status.decode(), blob or b"", (error or b"").decode())


async def _await_reply(future: asyncio.Future[Reply], wait_s: float, job_id: str, whole_s: float) -> Reply:
    """Await the reply for what is left (``wait_s``) of the caller's wait (``whole_s``, which the
    error names); a timer that cancels the future is cheaper than ``asyncio.wait_for``."""
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
            raise DeadlineExceeded(f"no result within {whole_s:.3g} s; the job was abandoned", job_id=job_id) from exc
        raise
    finally:
        timer.cancel()


async def predict(
    inbound: Inbound, scopes: tuple[str, ...], parse: Any, deadline: float | None = None
) -> tuple[Call, dict[str, Any], tuple[Any, ...]]:
    """A sync prediction through the whole pipeline. ``parse(doc, signature, max_rows)`` is the
    front door's translation of its body: it returns ``(tensors, *extra)``; the answer is the
    call, the outputs and ``extra`` (e.g. the OIP request id and requested outputs).
    ``deadline`` (``time.monotonic()`` at which a gRPC caller stops waiting) bounds the wait like
    ``X-Bastion-Timeout-Ms`` does, counted from now, after authentication and parsing."""
    state, call, doc = await begin(inbound, scopes)
    with breaker_call(state, call):
        wait = timeout_s(state, inbound.headers.get("x-bastion-timeout-ms"), call.model)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("the call's deadline passed before it was queued")
            wait = min(wait, left)
        tensors, *extra = parse(doc, call.chosen.signature, state.settings.max_rows)
        call.rows = rows_of(tensors)
        outputs = await run_sync(state, call, tensors, wait)
    admission = call.admission
    if admission is not None and admission.replayed_job is None and not admission.cached:
        copy_to_shadows(state, call, tensors, outputs)
    return call, outputs, tuple(extra)


# async ------------------------------------------------------------------------------------
async def submit(inbound: Inbound, scopes: tuple[str, ...], parse: Any) -> tuple[Call, str]:
    """Admit and queue an async job on the batch lane (within the tenant's stored-result count
    and bytes, else 429); with a reused Idempotency-Key, the first job's id. Its breaker learns
    only when its permit is a half-open probe: then the job's outcome is watched, so async-only
    traffic can close a breaker too."""
    state, call, doc = await begin(inbound, scopes)
    permit, call.permit = call.permit, None
    try:
        tensors, *_ = parse(doc, call.chosen.signature, state.settings.max_rows)
        call.rows = rows_of(tensors)
        job_id = new_job_id()
        call.job_id = job_id
        env = call.envelope(LANE_BATCH, job_id, codec.encode(tensors))
        async with redis_errors():
            call.admission = await state.producer.enqueue(
                env,
                limits=call.key.limits,
                idempotency=call.idem.pair if call.idem else None,
                max_queue=serving_of(state, call.model).max_queue_batch,
                storage=Storage(state.settings.max_stored_results, state.settings.max_stored_result_bytes),
            )
        if call.span is not None:
            _enqueued(call.span, call, call.admission)
    except BaseException:
        state.breakers.record(permit, Outcome.IGNORED)
        raise
    if call.admission.replayed_job is not None:
        call.job_id = call.admission.replayed_job
        state.breakers.record(permit, Outcome.IGNORED)
    elif permit is not None and permit.probe:
        state.spawn(_watch_probe(state, permit, job_id))
    else:
        state.breakers.record(permit, Outcome.IGNORED)  # a closed breaker learns from sync calls
    return call, call.job_id


async def _watch_probe(state: GatewayState, permit: Permit, job_id: str) -> None:
    """Hand a half-open breaker's probe back with the async job's outcome, judged only by the
    worker's own time (started → finished; a job still running at the limit by the time it has
    run). A job that has not started within ``PROBE_QUEUED_S`` is waiting in the queue, which
    says nothing about the version: the probe is handed back unjudged then, so a backlog holds
    the half-open breaker's one probe for at most that long."""
    outcome, elapsed = Outcome.IGNORED, None
    begun = time.monotonic()
    limit = begun + 2 * state.breakers.policy.slow_s
    queued_limit = begun + min(PROBE_QUEUED_S, state.breakers.policy.slow_s)
    try:
        while not state.draining:
            status, started, finished = await state.redis.hmget(job_key(job_id), "status", "started", "finished")
            text = (status or b"").decode()
            if text in TERMINAL_STATUSES:
                if text == STATUS_SUCCEEDED:
                    outcome = Outcome.OK
                elif text != STATUS_EXPIRED:
                    outcome = Outcome.FAILED
                if started and finished:
                    elapsed = max(0.0, (int(finished) - int(started)) / 1000)
                break
            now = time.monotonic()
            if not started and now >= queued_limit:
                break  # still queued: the probe goes back unjudged at once, for another call to take
            if now >= limit:
                if started:  # running for too long: slow
                    outcome, elapsed = Outcome.TIMEOUT, max(0.0, time.time() - int(started) / 1000)
                break
            await asyncio.sleep(PROBE_POLL_S)
    except (RedisError, OSError, ValueError):
        outcome = Outcome.IGNORED
    finally:
        state.breakers.record(permit, outcome, elapsed)


# shadows ----------------------------------------------------------------------------------
def copy_to_shadows(state: GatewayState, call: Call, tensors: dict[str, np.ndarray], outputs: dict[str, Any]) -> None:
    """Queue a copy of an answered request for each shadow route the caller's policy allows
    (shadow lane; never answers, never priced to the caller, no state a tenant can read).

    The copy carries the answer, so the worker can compare without a second lookup. Called after
    the answer is ready and not awaited: a shadow can neither delay nor change a response.
    """
    routes = state.snapshots.current.models.get(call.model)
    if routes is None or not routes.shadows:
        return
    answer: bytes | None = None
    blob = b""
    for shadow in routes.shadows:
        if not call.permits(shadow.version.version) or not routing.shadowed(call.model, shadow, call.subject):
            continue
        if answer is None:
            answer, blob = codec.encode(outputs), codec.encode(tensors)
        deadline_ms = int(time.time() * 1000) + SHADOW_RECORD_TTL_S * 1000  # a copy not run by then is dropped
        env = call.envelope(
            LANE_SHADOW, new_job_id(), blob, deadline_ms=deadline_ms, version=shadow.version, role=ROLE_SHADOW
        )
        env.compare = answer
        state.spawn(_enqueue_shadow(state, env, shadow.version))


async def _enqueue_shadow(state: GatewayState, env: Any, version: VersionInfo) -> None:
    try:
        await state.producer.enqueue(env, limits=UNLIMITED)
    except BastionError as exc:  # the shadow lane is full: the copy is dropped, counted
        metrics.ERRORS.labels("gateway", "shadow_dropped").inc()
        log.info("shadow_dropped", model=version.model, version=version.version, reason=type(exc).__name__)
    except Exception as exc:  # a lost shadow copy costs a comparison, never a response
        metrics.ERRORS.labels("gateway", "shadow_enqueue").inc()
        log.warning(
            "shadow_enqueue_failed", model=version.model, version=version.version, error_type=type(exc).__name__
        )
