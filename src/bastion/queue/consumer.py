"""The worker's side of the queue: read, reclaim, complete and dead-letter jobs.

Delivery is at-least-once: an entry stays pending until ``complete`` acknowledges it together
with its stored outcome. Entries idle past the visibility timeout are claimed by another
consumer; an entry delivered ``max_deliveries`` times is dead-lettered instead of run again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import redis

from bastion.constants import (
    CONSUMER_GROUP,
    LANE_BATCH,
    LANES,
    STATUS_DEAD,
    cost_key,
    dead_letter_key,
    inflight_key,
    job_key,
    key_bucket_key,
    queue_key,
    reply_key,
    shadow_key,
    tenant_bucket_key,
)
from bastion.queue.protocol import Job
from bastion.queue.scripts import Lua, run_pipeline

_COMPLETE = Lua("complete")
_START = Lua("start")
_SETTLE = Lua("settle")
_PRUNE = Lua("prune")
SHADOW_TTL_S = 30 * 86_400  # comparison figures of a shadow that stopped receiving copies expire


@dataclass(slots=True)
class Outcome:
    job: Job
    status: str
    result: bytes = b""
    error: str = ""
    dead_reason: str = ""
    measured_units: float | None = None  # compute units (ms of inference) this job's rows took


@dataclass(frozen=True, slots=True)
class Pending:
    """An entry delivered but not acknowledged, and how many times it was delivered."""

    stream: str
    entry_id: str
    times: int


class Consumer:
    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        result_ttl_s: int,
        sync_result_ttl_s: int,
        reply_cap: int = 10_000,
    ) -> None:
        self.client = client
        self.name = name
        self._result_ttl_s = result_ttl_s
        self._sync_result_ttl_s = sync_result_ttl_s
        self._reply_cap = reply_cap

    def ensure_groups(self, models: list[str]) -> None:
        for model in models:
            for lane in LANES:
                try:
                    self.client.xgroup_create(queue_key(model, lane), CONSUMER_GROUP, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise
                # Visible in XINFO CONSUMERS from the start, not only after a first delivery.
                self.client.xgroup_createconsumer(queue_key(model, lane), CONSUMER_GROUP, self.name)

    def read(self, models: list[str], count: int, block_ms: int | None) -> list[Job]:
        """New entries, up to ``count`` per stream."""
        streams = {queue_key(m, lane): ">" for m in models for lane in LANES}
        if not streams:
            time.sleep((block_ms or 0) / 1000)
            return []
        reply = self.client.xreadgroup(CONSUMER_GROUP, self.name, streams, count=count, block=block_ms)  # type: ignore[arg-type]
        return _jobs(reply)

    def pending(
        self, models: list[str], min_idle_ms: int, count: int = 100, only_consumer: str | None = None
    ) -> list[Pending]:
        """Entries idle at least ``min_idle_ms`` (of ``only_consumer``, or anyone's), oldest first."""
        found: list[Pending] = []
        for model in models:
            for lane in LANES:
                stream = queue_key(model, lane)
                listed: Any = self.client.xpending_range(
                    stream, CONSUMER_GROUP, min="-", max="+", count=count, idle=min_idle_ms, consumername=only_consumer
                )
                found += [Pending(stream, _s(p["message_id"]), int(p["times_delivered"])) for p in listed or []]
        return found

    def claim(self, entry: Pending, min_idle_ms: int) -> Job | None:
        """Take one idle entry (a delivery more); None when another consumer took it first or it is gone."""
        claimed: Any = self.client.xclaim(entry.stream, CONSUMER_GROUP, self.name, min_idle_ms, [entry.entry_id])
        for entry_id, fields in claimed or []:
            if not fields:  # deleted while pending: nothing to run, stop tracking it
                self.client.xack(entry.stream, CONSUMER_GROUP, entry_id)
                return None
            return Job.from_entry(entry.stream, _s(entry_id), fields)
        return None

    def reclaim(
        self,
        models: list[str],
        min_idle_ms: int,
        max_deliveries: int,
        count: int = 100,
        only_consumer: str | None = None,
    ) -> tuple[list[Job], list[Job]]:
        """Claim every entry idle past ``min_idle_ms`` at once: (to run again, to dead-letter).

        The worker claims one at a time instead (``pending`` + ``claim``), just before running
        each, so nothing it holds waits unwatched and a crash charges only the job it was running.
        """
        run: list[Job] = []
        dead: list[Job] = []
        for entry in self.pending(models, min_idle_ms, count, only_consumer):
            job = self.claim(entry, min_idle_ms)
            if job is not None:
                # XPENDING counted the earlier deliveries; XCLAIM just added one more.
                (dead if entry.times >= max_deliveries else run).append(job)
        return run, dead

    def prune(self, models: list[str], idle_s: float) -> int:
        """Remove consumers (dead workers' names) idle ``idle_s`` with nothing pending; how many."""
        pipe = self.client.pipeline(transaction=False)
        for model in models:
            for lane in LANES:
                _PRUNE.queue(pipe, [queue_key(model, lane)], [CONSUMER_GROUP, int(idle_s * 1000), self.name])
        if not pipe.command_stack:
            return 0
        return sum(int(n) for n in run_pipeline(self.client, pipe, [_PRUNE]))

    def touch(self, jobs: list[Job]) -> None:
        """Reset the idle time of jobs this consumer holds, so nobody reclaims them while they run.

        ``XCLAIM … 0 … JUSTID`` by the owner: the entry stays ours, its delivery count unchanged.
        """
        streams: dict[str, list[Any]] = {}
        for job in jobs:
            streams.setdefault(job.stream, []).append(job.entry_id)
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in streams.items():
            pipe.xclaim(stream, CONSUMER_GROUP, self.name, 0, ids, justid=True)
        pipe.execute()

    def release(self, jobs: list[Job], idle_ms: int) -> None:
        """Give jobs back without an outcome: their idle time is set past the visibility timeout,
        so the next reclaim by any worker takes them (counting a delivery)."""
        streams: dict[str, list[Any]] = {}
        for job in jobs:
            streams.setdefault(job.stream, []).append(job.entry_id)
        pipe = self.client.pipeline(transaction=False)
        for stream, ids in streams.items():
            pipe.xclaim(stream, CONSUMER_GROUP, self.name, 0, ids, idle=idle_ms, justid=True)
        pipe.execute()

    def depths(self, models: list[str]) -> list[tuple[str, str, int]]:
        """(model, lane, entries waiting or in progress) for each stream."""
        pipe = self.client.pipeline(transaction=False)
        pairs = [(m, lane) for m in models for lane in LANES]
        for model, lane in pairs:
            pipe.xlen(queue_key(model, lane))
        return [(m, lane, int(n)) for (m, lane), n in zip(pairs, pipe.execute(), strict=True)]

    def mark_running(self, jobs: list[Job]) -> None:
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for job in jobs:
            if job.stream.endswith(":" + LANE_BATCH):
                _START.queue(pipe, [job_key(job.job_id)], [self.name, now_ms, os.getpid()])
        if pipe.command_stack:
            run_pipeline(self.client, pipe, [_START])

    def complete(self, outcomes: list[Outcome]) -> list[str]:
        """Store outcomes, reply to waiting gateways, acknowledge - one round trip."""
        if not outcomes:
            return []
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for o in outcomes:
            job = o.job
            is_async = not job.reply_to
            keys = [
                job_key(job.job_id),
                job.stream,
                reply_key(job.reply_to or "none"),
                dead_letter_key(job.model),
                inflight_key(job.tenant),
            ]
            extra: list[Any] = []
            if o.dead_reason:
                for k, v in job.fields.items():
                    extra += [k, v]
                extra += [b"entry", job.entry_id]
            args: list[Any] = [
                job.entry_id,
                CONSUMER_GROUP,
                o.status,
                o.result,
                o.error,
                self._result_ttl_s if is_async else self._sync_ttl(job, now_ms),
                job.job_id,
                "0" if is_async else "1",
                self._reply_cap,
                job.tenant,
                job.model,
                now_ms,
                o.dead_reason,
                "1" if job.counted else "0",
                *extra,
            ]
            _COMPLETE.queue(pipe, keys, args)
        return [_s(s) for s in run_pipeline(self.client, pipe, [_COMPLETE])]

    def settle(self, outcomes: list[Outcome]) -> None:
        """Correct the buckets with the measured cost of the jobs that ran, and learn the cost per row.

        One call per (tenant, key, model) group: reserved and measured units and rows summed.
        """
        groups: dict[tuple[str, str, str], list[float]] = {}
        for o in outcomes:
            if o.measured_units is None or not o.job.rows:
                continue
            g = groups.setdefault((o.job.tenant, o.job.key_id, o.job.model), [0.0, 0.0, 0])
            g[0] += o.job.cost
            g[1] += o.measured_units
            g[2] += o.job.rows
        if not groups:
            return
        pipe = self.client.pipeline(transaction=False)
        for (tenant, key_id, model), (reserved, measured, rows) in groups.items():
            keys = [tenant_bucket_key(tenant, model), key_bucket_key(key_id or "-"), cost_key(model)]
            _SETTLE.queue(pipe, keys, [reserved, measured, int(rows)])
        run_pipeline(self.client, pipe, [_SETTLE])

    def record_shadow(self, totals: dict[tuple[str, int], list[float]]) -> None:
        """Add shadow comparison counts: (model, version) -> [requests, rows, agree, abs_sum, values]."""
        if not totals:
            return
        pipe = self.client.pipeline(transaction=False)
        for (model, version), (requests, rows, agree, abs_sum, values) in totals.items():
            key = shadow_key(model, version)
            pipe.hincrby(key, "requests", int(requests))
            pipe.hincrby(key, "rows", int(rows))
            pipe.hincrby(key, "agree_rows", int(agree))
            pipe.hincrbyfloat(key, "abs_diff_sum", abs_sum)
            pipe.hincrby(key, "values", int(values))
            pipe.expire(key, SHADOW_TTL_S)
        pipe.execute()

    def _sync_ttl(self, job: Job, now_ms: int) -> int:
        """A sync outcome is needed only until its caller's deadline (plus a margin for clocks)."""
        if not job.deadline_ms:
            return self._sync_result_ttl_s
        return max(1, min(self._sync_result_ttl_s, (job.deadline_ms - now_ms) // 1000 + 5))

    def dead_letter(self, jobs: list[Job], max_deliveries: int) -> None:
        self.complete(
            [
                Outcome(
                    job,
                    STATUS_DEAD,
                    error=f"the job failed on {max_deliveries} deliveries and was moved to the dead-letter queue",
                    dead_reason=f"delivered {max_deliveries} times without completing",
                )
                for job in jobs
            ]
        )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _jobs(reply: Any) -> list[Job]:
    jobs: list[Job] = []
    for stream, entries in reply or []:
        name = _s(stream)
        for entry_id, fields in entries:
            if fields:  # an entry deleted while pending comes back empty
                jobs.append(Job.from_entry(name, _s(entry_id), fields))
    return jobs
