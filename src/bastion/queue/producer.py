"""The gateway's side of the queue: one atomic script call per job, pipelined across requests.

Requests that reach ``enqueue`` in the same event-loop turn share one pipeline (one write, one
read) instead of a round trip each; every call still gets its own answer or error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bastion.constants import EVALUATION_TENANT, LANE_BATCH, LANE_SYNC, job_key, queue_key
from bastion.errors import Overloaded
from bastion.queue.protocol import entry_fields
from bastion.queue.scripts import Lua, arun_pipeline

_ENQUEUE = Lua("enqueue")
_ABANDON = Lua("abandon")


class Producer:
    def __init__(self, redis: Any, *, max_queue_sync: int, max_queue_batch: int, result_ttl_s: int) -> None:
        self.redis = redis
        self._limits = {LANE_SYNC: max_queue_sync, LANE_BATCH: max_queue_batch}
        self._result_ttl_s = result_ttl_s
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
    ) -> None:
        """Queue a job or raise ``Overloaded`` when the model's queue is over its limit."""
        now_ms = int(time.time() * 1000)
        fields = entry_fields(job_id, tenant, model, version, deadline_ms, reply_to, now_ms, blob, compare)
        keep_state = "1" if lane == LANE_BATCH else "0"
        args = [self._limits[lane], keep_state, self._result_ttl_s, tenant, model, now_ms, *fields]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(([queue_key(model, lane), job_key(job_id)], args, future))
        accepted, detail = await future
        if not accepted:
            raise Overloaded(
                f"model {model!r} has {detail} jobs waiting on the {lane} lane; retry later", retry_after=1
            )

    async def abandon(self, *, job_id: str, tenant: str, model: str, error: str, ttl_s: int) -> bool:
        """Record that the caller stopped waiting; False when the job already had an outcome."""
        args = [tenant, model, error, ttl_s, int(time.time() * 1000)]
        return bool(await _ABANDON.acall(self.redis, [job_key(job_id)], args))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                keys, args, future = batch[0]
                results: list[Any] = [await _ENQUEUE.acall(self.redis, keys, args)]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for keys, args, _ in batch:
                    _ENQUEUE.queue(pipe, keys, args)
                results = await arun_pipeline(self.redis, pipe, [_ENQUEUE])
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
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
    args = [max_queue, "1", ttl_s, EVALUATION_TENANT, model, now_ms, *fields]
    accepted, detail = _ENQUEUE.call(client, [queue_key(model, LANE_BATCH), job_key(job_id)], args)
    if not accepted:
        raise Overloaded(f"model {model!r} has {detail} jobs waiting on the batch lane; retry later", retry_after=5)
