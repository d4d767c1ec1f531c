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
    ) -> Admission:
        """Admit and queue a job, or raise ``RateLimited`` (a budget, the in-flight cap or, with
        ``storage``, the tenant's stored-result count or bytes is spent) or ``Overloaded`` (the
        model's queue is over ``max_queue``, else the lane's limit).

        ``idempotency`` is the (record key, request fingerprint) of an Idempotency-Key; a sync
        job's envelope also names the record (``env.idempotency``), where the worker stores its
        outcome. ``storage`` applies only to a tenant's async job (``calls.in_ledger``)."""
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
        )
        keys, args = calls.enqueue(env, admit)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return admitted(await future, env.model, env.lane)

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


def admitted(reply: Any, model: str, lane: str) -> Admission:
    """Turn enqueue.lua's answer into an ``Admission`` or the error that says why it was refused."""
    if int(reply[0]) == 1:
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
    tokens, cost, rate, burst = (float(_text(v)) for v in reply[2:6])
    name = "tenant-model" if reason == "tenant" else "key"
    window = refill_seconds(burst, rate)
    if cost > burst:
        wait = window
        detail = f"the request costs {cost:.4g} compute units, more than the {name} budget of {burst:.4g}"
    else:
        wait = max(1, math.ceil((cost - tokens) / rate)) if rate > 0 else window
        left = max(tokens, 0)
        detail = f"the {name} budget is spent ({left:.4g} of {burst:.4g} units left; this request costs {cost:.4g})"
    raise RateLimited(
        detail + f"; retry in {wait} s", retry_after=wait, headers=ratelimit_fields(name, tokens, burst, rate, wait)
    )


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
