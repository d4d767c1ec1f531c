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

from bastion.constants import (
    EVALUATION_TENANT,
    LANE_BATCH,
    LANE_SYNC,
    cost_key,
    inflight_key,
    job_key,
    key_bucket_key,
    queue_key,
    tenant_bucket_key,
)
from bastion.errors import IdempotencyMismatch, Overloaded, RateLimited
from bastion.queue.durability import Durability
from bastion.queue.protocol import entry_fields
from bastion.queue.scripts import Lua, arun_pipeline
from bastion.snapshot import Limits

_ENQUEUE = Lua("enqueue")
_ABANDON = Lua("abandon")


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
IDEMPOTENCY_TTL_S = 86_400


class Producer:
    def __init__(
        self,
        redis: Any,
        *,
        max_queue_sync: int,
        max_queue_batch: int,
        result_ttl_s: int,
        cost_per_row_default: float = 0.1,
        durability: Durability = EVERYSEC,
    ) -> None:
        self.redis = redis
        self.durability = durability
        self._limits = {LANE_SYNC: max_queue_sync, LANE_BATCH: max_queue_batch}
        self._result_ttl_s = result_ttl_s
        self._cost_default = cost_per_row_default
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(
        self,
        *,
        lane: str,
        job_id: str,
        tenant: str,
        model: str,
        version: int,
        blob: bytes,
        deadline_ms: int = 0,
        reply_to: str = "",
        compare: bytes = b"",
        rows: int = 1,
        key_id: str = "",
        limits: Limits = UNLIMITED,
        idempotency: tuple[str, str] | None = None,
        max_queue: int | None = None,
    ) -> Admission:
        """Admit and queue a job, or raise ``RateLimited`` (a budget or the in-flight cap is spent)
        or ``Overloaded`` (the model's queue is over ``max_queue``, else the lane's limit)."""
        now_ms = int(time.time() * 1000)
        fields = entry_fields(
            job_id, tenant, model, version, deadline_ms, reply_to, now_ms, blob, compare, rows=rows, key_id=key_id
        )
        keep_state = "1" if lane == LANE_BATCH else "0"
        args = [
            self._limits[lane] if max_queue is None else max_queue,
            keep_state,
            self._result_ttl_s,
            tenant,
            model,
            now_ms,
            rows,
            limits.tenant_rate,
            limits.tenant_burst,
            limits.key_rate,
            limits.key_burst,
            limits.max_concurrency,
            self._cost_default,
            idempotency[1] if idempotency else "",
            IDEMPOTENCY_TTL_S,
            job_id,
            *fields,
        ]
        keys = [
            queue_key(model, lane),
            job_key(job_id),
            tenant_bucket_key(tenant, model),
            key_bucket_key(key_id or "-"),
            inflight_key(tenant),
            cost_key(model),
            idempotency[0] if idempotency else "idem:-",
        ]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return admitted(await future, model, lane)

    async def abandon(
        self, *, job_id: str, tenant: str, model: str, error: str, ttl_s: int, counted: bool = False
    ) -> bool:
        """Record that the caller stopped waiting; False when the job already had an outcome."""
        args = [tenant, model, error, ttl_s, int(time.time() * 1000), "1" if counted else "0"]
        return bool(await _ABANDON.acall(self.redis, [job_key(job_id), inflight_key(tenant)], args))

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
                results: list[Any] = [await _ENQUEUE.acall(self.redis, keys, args)]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    _ENQUEUE.queue(pipe, keys, args)
                results = await arun_pipeline(self.redis, pipe, [_ENQUEUE], tail=confirm)
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

    The job state hash is kept like an async job's, under the tenant ``EVALUATION_TENANT``.
    """
    now_ms = int(time.time() * 1000)
    fields = entry_fields(job_id, EVALUATION_TENANT, model, version, 0, "", now_ms, b"", evaluation=spec)
    args = [max_queue, "1", ttl_s, EVALUATION_TENANT, model, now_ms, 0, 0, 0, 0, 0, 0, 0, "", 0, job_id, *fields]
    keys = [
        queue_key(model, LANE_BATCH),
        job_key(job_id),
        tenant_bucket_key(EVALUATION_TENANT, model),
        key_bucket_key("-"),
        inflight_key(EVALUATION_TENANT),
        cost_key(model),
        "idem:-",
    ]
    admitted(_ENQUEUE.call(client, keys, args), model, LANE_BATCH)


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
