"""The gateway's side of the queue: one atomic script call per job."""

from __future__ import annotations

import time
from typing import Any

from bastion.constants import LANE_BATCH, job_key, queue_key
from bastion.errors import Overloaded
from bastion.queue.protocol import entry_fields, script


class Producer:
    def __init__(self, redis: Any, *, max_queue_sync: int, max_queue_batch: int, result_ttl_s: int) -> None:
        self._enqueue = redis.register_script(script("enqueue"))
        self._limits = {"sync": max_queue_sync, LANE_BATCH: max_queue_batch}
        self._result_ttl_s = result_ttl_s

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
    ) -> None:
        """Queue a job or raise ``Overloaded`` when the model's queue is over its limit."""
        now_ms = int(time.time() * 1000)
        fields = entry_fields(job_id, tenant, model, version, deadline_ms, reply_to, now_ms, blob)
        keep_state = "1" if lane == LANE_BATCH else "0"
        args = [self._limits[lane], keep_state, self._result_ttl_s, tenant, model, now_ms, *fields]
        accepted, detail = await self._enqueue(keys=[queue_key(model, lane), job_key(job_id)], args=args)
        if not accepted:
            raise Overloaded(
                f"model {model!r} has {detail} jobs waiting on the {lane} lane; retry later", retry_after=1
            )
