"""The worker's side of the queue: read, reclaim, complete and dead-letter jobs.

Delivery is at-least-once: an entry stays pending until ``complete`` acknowledges it together
with its stored outcome. Entries idle past the visibility timeout are claimed by another
consumer; an entry delivered ``max_deliveries`` times is dead-lettered instead of run again.
An outcome Redis refuses to store (it is out of memory, ``noeviction``) leaves its entry
pending and unacknowledged (``Outcome.refused``): the worker tries again, or the job is
redelivered; it is never acknowledged without its outcome.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from bastion.constants import (
    CONSUMER_GROUP,
    LANE_BATCH,
    LANE_SHADOW,
    LANE_SYNC,
    LANES,
    STATUS_DEAD,
    STATUS_SUCCEEDED,
    queue_key,
    shadow_key,
)
from bastion.queue import calls, decisions
from bastion.queue.calls import DeadLetters
from bastion.queue.envelope import Job
from bastion.queue.scripts import run_pipeline

SHADOW_TTL_S = 30 * 86_400  # comparison figures of a shadow that stopped receiving copies expire


@dataclass(slots=True)
class Outcome:
    job: Job
    status: str
    result: bytes = b""
    error: str = ""
    dead_reason: str = ""
    measured_units: float | None = None  # compute units (ms of inference) this job's rows took
    ran: bool = False  # the model ran it (an expired job did not: its price teaches nothing)
    stored: bool = False  # set by ``complete``: this outcome is the job's (not a redelivery's repeat)
    settles: bool = False  # set by ``complete``: the first worker outcome, which settles the cost
    refused: bool = False  # set by ``complete``: Redis refused the write (out of memory); still pending
    guards: list[dict[str, Any]] = field(default_factory=list)  # output guard results, for the decision log


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
        floor_per_row: float = calls.Pricing().floor_per_row,
        result_cost_per_kib: float = 0.0,
        dead_letters: DeadLetters = DeadLetters(),  # noqa: B008 - frozen dataclass
        max_stored_result_bytes: int = 0,
        artifact_of: Callable[[str, int], str] | None = None,
    ) -> None:
        """``artifact_of(model, version)``, the version's artifact sha256, turns the decision
        log on: each answered decision's event is written with its outcome (None: off)."""
        self.client = client
        self.name = name
        self._result_ttl_s = result_ttl_s
        self._sync_result_ttl_s = sync_result_ttl_s
        self._reply_cap = reply_cap
        self._floor_per_row = floor_per_row
        self._result_cost_per_kib = result_cost_per_kib
        self._dead_letters = dead_letters
        self._max_stored_bytes = max_stored_result_bytes
        self._artifact_of = artifact_of

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

    def read(
        self, models: list[str], count: int, block_ms: int | None, shadowed: frozenset[str] = frozenset()
    ) -> list[Job]:
        """New entries, up to ``count`` per stream. The shadow lanes (of the ``shadowed`` models)
        are read only for the room the sync and batch lanes left in the batch, so unpriced
        copies never take a worker's time from the traffic that pays for it (copies that find no
        room wait, and are dropped at the gateway once their lane is full)."""
        if not models:
            time.sleep((block_ms or 0) / 1000)
            return []
        served = {queue_key(m, lane): ">" for m in models for lane in (LANE_SYNC, LANE_BATCH)}
        found = self._read(served, count, block_ms)
        if shadowed and len(found) < count:
            lanes = {queue_key(m, LANE_SHADOW): ">" for m in models if m in shadowed}
            if lanes:
                found += self._read(lanes, count - len(found), None)
        return found

    def _read(self, streams: dict[str, str], count: int, block_ms: int | None) -> list[Job]:
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
                calls.PRUNE.queue(pipe, *calls.prune(queue_key(model, lane), int(idle_s * 1000), self.name))
        if not pipe.command_stack:
            return 0
        return sum(int(n) for n in run_pipeline(self.client, pipe, [calls.PRUNE]))

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

    def mark_running(self, jobs: list[Job], child_pid: int | None = None) -> None:
        """Mark async jobs running by this worker, or (``child_pid``) name the child process that
        took one over; never for a job that has an outcome or whose state expired (a state is
        never recreated here)."""
        now_ms = None if child_pid else int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for job in jobs:
            if job.lane == LANE_BATCH or job.stream.endswith(":" + LANE_BATCH):
                calls.START.queue(pipe, *calls.start(job, self.name, now_ms, child_pid or os.getpid()))
        if pipe.command_stack:
            run_pipeline(self.client, pipe, [calls.START])

    def complete(self, outcomes: list[Outcome]) -> list[str]:
        """Store outcomes, reply to waiting gateways, acknowledge - one round trip. Returns the
        status stored for each; '' for an outcome Redis refused for want of memory (``refused``:
        its entry stays pending). Any other error is raised."""
        if not outcomes:
            return []
        now_ms = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        for o in outcomes:
            job = o.job
            ttl = self._result_ttl_s if job.is_async else self._sync_ttl(job, now_ms)
            decision = b""
            if self._artifact_of is not None and o.status == STATUS_SUCCEEDED and decisions.is_decision(job):
                decision = decisions.event(job, self._artifact_of(job.model, job.version), now_ms, guards=o.guards)
            keys, args = calls.complete(
                job,
                o.status,
                o.result,
                o.error,
                ttl_s=ttl,
                finished_ms=now_ms,
                reply_cap=self._reply_cap,
                dead_reason=o.dead_reason,
                letters=self._dead_letters,
                max_stored_bytes=self._max_stored_bytes,
                decision=decision,
            )
            calls.COMPLETE.queue(pipe, keys, args)
        results = run_pipeline(self.client, pipe, [calls.COMPLETE], raise_errors=False)
        errors = [r for r in results if isinstance(r, Exception) and not out_of_memory(r)]
        if errors:
            raise errors[0]
        statuses = []
        for o, result in zip(outcomes, results, strict=True):
            o.refused = isinstance(result, Exception)
            if o.refused:
                o.stored = o.settles = False
                statuses.append("")
                continue
            status, stored, settles = result
            o.stored, o.settles = int(stored) == 1, int(settles) == 1
            if o.stored and _s(status) != o.status:
                o.result = b""  # not kept (over the tenant's stored-result bytes): nothing to charge
            statuses.append(_s(status))
        return statuses

    def settle(self, outcomes: list[Outcome]) -> None:
        """Give back (or take) the difference between what each job reserved and what it
        measured, and learn each version's cost per row from the jobs that ran.

        One call per (tenant, key, model, version). Only the first worker outcome of a job
        counts (``complete`` ran first and said so): a redelivered job that ran twice is settled
        once, and a job its gateway abandoned is still refunded. A job that reserved
        nothing (a replayed dead letter) corrects no bucket; a job that did not run (expired)
        teaches no price; shadow copies and evaluations do neither (never priced to a caller).
        """
        groups: dict[tuple[str, str, str, int], list[float]] = {}
        for o in outcomes:
            job = o.job
            if o.measured_units is None or not o.settles or job.is_shadow or not job.rows:
                continue
            g = groups.setdefault((job.tenant, job.key_id, job.model, job.version), [0.0, 0.0, 0.0, 0])
            if job.cost > 0:
                g[0] += job.cost
                g[1] += o.measured_units + self.storage_units(o)
            if o.ran:
                g[2] += o.measured_units
                g[3] += job.rows
        pipe = self.client.pipeline(transaction=False)
        for (tenant, key_id, model, version), (reserved, measured, ran, rows) in groups.items():
            if reserved or rows:
                keys, args = calls.settle(
                    tenant,
                    key_id,
                    model,
                    version,
                    reserved=reserved,
                    measured_reserved=measured,
                    measured_ran=ran,
                    rows_ran=int(rows),
                    floor_per_row=self._floor_per_row,
                )
                calls.SETTLE.queue(pipe, keys, args)
        if pipe.command_stack:
            run_pipeline(self.client, pipe, [calls.SETTLE])

    def storage_units(self, o: Outcome) -> float:
        """What keeping an async job's result costs: ``result_cost_per_kib`` per KiB of the stored
        result (only the stored outcome of a tenant's async job; a sync result lives only until
        its caller has it, minutes at most, and is not charged)."""
        if not o.stored or not o.result or not calls.in_ledger(o.job):
            return 0.0
        return self._result_cost_per_kib * len(o.result) / 1024

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


def out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write because it is at ``maxmemory`` (``noeviction``)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or (
        isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM")
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
