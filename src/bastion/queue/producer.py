"""The gateway's side of the queue: one atomic script call per job, pipelined across requests.

Requests that reach ``enqueue`` in the same event-loop turn share one pipeline (one write, one
read) instead of a round trip each; every call still gets its own answer or error.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from bastion.constants import EVALUATION_TENANT, LANE_BATCH, LANE_SHADOW, LANE_SYNC
from bastion.errors import IdempotencyMismatch, Overloaded, RateLimited
from bastion.queue import calls
from bastion.queue.calls import Admit, Pricing, Storage
from bastion.queue.durability import Durability
from bastion.queue.envelope import ROLE_EVALUATION, Envelope
from bastion.queue.scripts import arun_pipeline
from bastion.snapshot import Limits


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission reserved for a queued job, and what is left in its buckets (None: no bucket)."""

    cost: float
    tenant_left: float | None
    key_left: float | None
    counted: bool = False
    replayed_job: str | None = None  # the Idempotency-Key was used for this request before: its job
    cached: bool = False  # answered from the model's response cache: nothing was queued
    tokens: int = 0  # text tokens reserved (a text job; 0: none)
    tenant_tokens_left: float | None = None  # a text job's token and request buckets (None: no bucket)
    tenant_requests_left: float | None = None
    key_tokens_left: float | None = None
    key_requests_left: float | None = None


UNLIMITED = Limits()
EVERYSEC = Durability()
ASYNC_SLOT_MS = 3_600_000  # an async job's in-flight slot lapses after an hour if never given back
SLOT_MARGIN_MS = 5_000  # a sync job's slot lapses this long after its deadline


class Producer:
    def __init__(
        self,
        redis: Any,
        *,
        max_queue_sync: int,
        max_queue_batch: int,
        result_ttl_s: int,
        max_queue_shadow: int = 10_000,
        pricing: Pricing = Pricing(),  # noqa: B008 - frozen dataclass
        durability: Durability = EVERYSEC,
    ) -> None:
        self.redis = redis
        self.durability = durability
        self._limits = {LANE_SYNC: max_queue_sync, LANE_BATCH: max_queue_batch, LANE_SHADOW: max_queue_shadow}
        self._result_ttl_s = result_ttl_s
        self.pricing = pricing
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(
        self,
        env: Envelope,
        *,
        limits: Limits = UNLIMITED,
        idempotency: tuple[str, str] | None = None,
        max_queue: int | None = None,
        storage: Storage | None = None,
        tokens: int = 0,
    ) -> Admission:
        """Admit and queue a job, or raise ``RateLimited`` (a budget, the in-flight cap or, with
        ``storage``, the tenant's stored-result count or bytes is spent) or ``Overloaded`` (the
        model's queue is over ``max_queue``, else the lane's limit).

        ``idempotency`` is the (record key, request fingerprint) of an Idempotency-Key; a sync
        job's envelope also names the record (``env.idempotency``), where the worker stores its
        outcome. ``storage`` applies only to a tenant's async job (``calls.in_ledger``).

        ``tokens`` (a text job: prompt tokens + ``max_tokens`` for a generation, the prompt
        tokens of an embedding) are taken from the caller's token buckets, and one request from
        its request buckets, in the same atomic call (a refusal is ``RateLimited``); the entry
        carries them as ``t`` and the worker gives back what the job did not use
        (``calls.settle_tokens``). 0: not a text job; no token or request bucket is touched."""
        env.created_ms = now_ms = int(time.time() * 1000)
        slot_ms = env.deadline_ms - now_ms + SLOT_MARGIN_MS if env.deadline_ms else ASYNC_SLOT_MS
        admit = Admit(
            max_queue=self._limits[env.lane] if max_queue is None else max_queue,
            keep_state=env.lane == LANE_BATCH,
            state_ttl_s=self._result_ttl_s,
            limits=limits,
            pricing=self.pricing,
            slot_ms=max(slot_ms, SLOT_MARGIN_MS),
            idempotency=idempotency,
            storage=storage if storage is not None and calls.in_ledger(env) else None,
            tokens=tokens,
        )
        keys, args = calls.enqueue(env, admit)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return admitted(await future, env.model, env.lane, tokens)

    async def abandon(self, env: Envelope, error: str, ttl_s: int, counted: bool = False) -> bool:
        """Record that the caller stopped waiting; False when the job already had an outcome.
        ``counted``: the job holds an in-flight slot (its admission said so)."""
        keys, args = calls.abandon(
            env.job_id,
            env.tenant,
            env.model,
            error,
            ttl_s=ttl_s,
            finished_ms=int(time.time() * 1000),
            idempotency=env.idempotency,
            counted=counted,
        )
        return bool(await calls.ABANDON.acall(self.redis, keys, args))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        confirm = self.durability.command
        try:
            if len(batch) == 1 and not confirm:
                keys, args, future = batch[0]
                results: list[Any] = [await calls.ENQUEUE.acall(self.redis, keys, args)]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    calls.ENQUEUE.queue(pipe, keys, args)
                results = await arun_pipeline(self.redis, pipe, [calls.ENQUEUE], tail=confirm)
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        durable = True
        if confirm:
            durable = all(self.durability.confirmed(t) for t in results.pop())
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            elif not durable and int(result[0]) in (1, 2):  # queued now, or earlier (a replay)
                future.set_exception(self.durability.refusal())
            else:
                future.set_result(result)


def enqueue_evaluation(
    client: Any, *, job_id: str, model: str, version: int, spec: bytes, max_queue: int, ttl_s: int
) -> None:
    """Queue an evaluation job on the model's batch lane (sync client; the control plane's call).

    The job state hash is kept like an async job's, under the tenant ``EVALUATION_TENANT``; no
    budget applies and no price is learned from it (it has no rows).
    """
    env = Envelope(
        job_id=job_id,
        tenant=EVALUATION_TENANT,
        model=model,
        version=version,
        lane=LANE_BATCH,
        role=ROLE_EVALUATION,
        created_ms=int(time.time() * 1000),
        evaluation=spec,
    )
    admit = Admit(
        max_queue=max_queue, keep_state=True, state_ttl_s=ttl_s, limits=UNLIMITED, pricing=Pricing(), slot_ms=0
    )
    keys, args = calls.enqueue(env, admit)
    admitted(calls.ENQUEUE.call(client, keys, args), model, LANE_BATCH)


def admitted(reply: Any, model: str, lane: str, tokens: int = 0) -> Admission:
    """Turn enqueue.lua's answer into an ``Admission`` or the error that says why it was refused."""
    if int(reply[0]) == 1:
        if len(reply) > 6:  # a text job: its token and request buckets follow
            return Admission(
                float(reply[2]),
                _number(reply[3]),
                _number(reply[4]),
                int(reply[5]) == 1,
                tokens=tokens,
                tenant_tokens_left=_number(reply[6]),
                tenant_requests_left=_number(reply[7]),
                key_tokens_left=_number(reply[8]),
                key_requests_left=_number(reply[9]),
            )
        return Admission(float(reply[2]), _number(reply[3]), _number(reply[4]), int(reply[5]) == 1)
    if int(reply[0]) == 2:
        return Admission(0.0, None, None, replayed_job=_text(reply[1]))
    reason = _text(reply[1])
    if reason == "idempotency":
        raise IdempotencyMismatch(
            "this Idempotency-Key was already used for a different request; use a new key for a new request"
        )
    if reason == "queue":
        raise Overloaded(f"model {model!r} has {int(reply[2])} jobs waiting on the {lane} lane; retry later")
    if reason in ("stored", "stored_bytes"):
        held, cap, wait = _text(reply[2]), _text(reply[3]), max(1, int(reply[4]))
        if reason == "stored":
            what = f"stored results: {held} of {cap} (the tenant's queued and kept async job results)"
        else:
            what = (
                f"stored result bytes: {held} of {cap} (the tenant's kept async job results, and its queued "
                "ones at their average size)"
            )
        raise RateLimited(f"{what}; retry in {wait} s, when the oldest expires", retry_after=wait)
    if reason == "concurrency":
        raise RateLimited(
            f"the tenant has {_text(reply[2])} jobs in flight, its limit; retry when one finishes", retry_after=1
        )
    level, cost, rate, burst = (float(_text(v)) for v in reply[2:6])
    if reason in TEXT_BUCKETS:
        raise text_refusal(reason, level, cost, rate, burst)
    name = "tenant-model" if reason == "tenant" else "key"
    window = refill_seconds(burst, rate)
    if cost > burst:
        wait = window
        detail = f"the request costs {cost:.4g} compute units, more than the {name} budget of {burst:.4g}"
    else:
        wait = max(1, math.ceil((cost - level) / rate)) if rate > 0 else window
        left = max(level, 0)
        detail = f"the {name} budget is spent ({left:.4g} of {burst:.4g} units left; this request costs {cost:.4g})"
    raise RateLimited(
        detail + f"; retry in {wait} s", retry_after=wait, headers=ratelimit_fields(name, level, burst, rate, wait)
    )


# enqueue.lua's refusal reason of a text bucket -> (RateLimit policy name, what it counts)
TEXT_BUCKETS = {
    "tenant_tokens": ("tenant-model-tokens", "token"),
    "tenant_requests": ("tenant-model-requests", "request"),
    "key_tokens": ("key-tokens", "token"),
    "key_requests": ("key-requests", "request"),
}


def text_refusal(reason: str, level: float, need: float, per_min: float, burst: float) -> RateLimited:
    """The 429 of a spent token or request bucket (refilled ``per_min``), with its RateLimit fields."""
    name, unit = TEXT_BUCKETS[reason]
    owner = "tenant-model" if reason.startswith("tenant") else "key"
    window = minute_refill_seconds(burst, per_min)
    if need > burst:
        wait = window
        detail = f"the request needs {need:.0f} {unit}s, more than the {owner} {unit} budget of {burst:.0f}"
        if unit == "token":
            detail += " (it counts the prompt + max_tokens); lower max_tokens or shorten the prompt"
    else:
        wait = max(1, minute_refill_seconds(need - level, per_min)) if per_min > 0 else window
        detail = (
            f"the {owner} {unit} budget is spent ({max(level, 0):.0f} of {burst:.0f} {unit}s left, "
            f"{per_min:.0f} a minute; this request needs {need:.0f})"
        )
    return RateLimited(
        detail + f"; retry in {wait} s",
        retry_after=wait,
        headers=text_fields(name, level, burst, per_min, wait),
    )


def text_ratelimit_fields(limits: Limits, admission: Admission) -> dict[str, str]:
    """A queued text job's IETF ``RateLimit-Policy`` / ``RateLimit`` fields: the tighter of its
    token buckets and the tighter of its request buckets (each list item one bucket; {}: none)."""
    policies, levels = [], []
    for pair in (
        (
            (admission.tenant_tokens_left, limits.tenant_tokens_burst, limits.tenant_tokens_per_min, "tenant_tokens"),
            (admission.key_tokens_left, limits.key_tokens_burst, limits.key_tokens_per_min, "key_tokens"),
        ),
        (
            (
                admission.tenant_requests_left,
                limits.tenant_requests_burst,
                limits.tenant_requests_per_min,
                "tenant_requests",
            ),
            (admission.key_requests_left, limits.key_requests_burst, limits.key_requests_per_min, "key_requests"),
        ),
    ):
        found = [(left, burst, per_min, reason) for left, burst, per_min, reason in pair if left is not None]
        if not found:
            continue
        left, burst, per_min, reason = min(found)
        fields = text_fields(
            TEXT_BUCKETS[reason][0], left, burst, per_min, minute_refill_seconds(burst - left, per_min)
        )
        policies.append(fields["RateLimit-Policy"])
        levels.append(fields["RateLimit"])
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(levels)}


def join_ratelimit_fields(*found: dict[str, str]) -> dict[str, str]:
    """Several buckets' ``RateLimit-Policy`` / ``RateLimit`` fields as one list each (the IETF
    fields are lists: a text job's compute bucket, then its token and request buckets)."""
    joined: dict[str, str] = {}
    for fields in found:
        for name, value in fields.items():
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


def minute_refill_seconds(units: float, per_min: float) -> int:
    """Seconds for a bucket refilled ``per_min`` to regain ``units`` (a day when it never refills)."""
    return max(math.ceil(units * 60 / per_min), 0) if per_min > 0 else 86_400


def text_fields(name: str, left: float, burst: float, per_min: float, reset_s: int) -> dict[str, str]:
    """``ratelimit_fields`` of a token or request bucket refilled per minute."""
    return {
        "RateLimit-Policy": f'"{name}";q={int(burst)};w={minute_refill_seconds(burst, per_min)}',
        "RateLimit": f'"{name}";r={max(int(left), 0)};t={reset_s}',
    }


def refill_seconds(units: float, rate: float) -> int:
    """Seconds for a bucket to regain ``units`` (a day when it never refills: its key's TTL)."""
    return max(math.ceil(units / rate), 0) if rate > 0 else 86_400


def ratelimit_fields(name: str, left: float, burst: float, rate: float, reset_s: int) -> dict[str, str]:
    """The IETF ``RateLimit-Policy`` and ``RateLimit`` header fields of one bucket."""
    return {
        "RateLimit-Policy": f'"{name}";q={int(burst)};w={refill_seconds(burst, rate)}',
        "RateLimit": f'"{name}";r={max(int(left), 0)};t={reset_s}',
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:
    text = _text(value)
    return float(text) if text else None
