"""The worker loop: read a batch, drop expired jobs, run the rest per model version, complete.

A worker holds no SQL credentials and listens on no port (a metrics port at most). On SIGTERM
it finishes the batch it holds, acknowledges it, and exits; anything it had not read stays
in the stream for the next worker. When Redis refuses to store outcomes (out of memory), the
worker keeps them and tries again for up to ``STORE_FULL_HOLD_S``, its jobs' claim kept alive
meanwhile; jobs still refused then stay pending and are redelivered later - never lost.

Text versions: embedding jobs are batched like any other, padded to the widest
(``worker.batching``); generation jobs are handed to ``worker.generate.Generations``, which the
loop steps between its reads (continuous batching; no read blocks, and no batch is waited for,
while a generation runs); an upstream version's generations are forwarded to its server the same
way (``bastion.runtime.upstream``). Once a text job's outcome is stored, the tokens it reserved beyond
what it used go back to its token budget (``bastion.queue.calls.settle_tokens``).

With tracing on, each model version's batch has its spans (``worker.spans``): a batch span
linked to each job's trace, a child span per job in that job's trace, model calls and the reply.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from types import FrameType
from typing import Any

import numpy as np
import orjson
import redis

from bastion import codec, holdout, logs, metrics, tracing
from bastion.constants import (
    LANE_SHADOW,
    SNAPSHOT_CHANNEL,
    SNAPSHOT_KEY,
    STATUS_EXPIRED,
    STATUS_FAILED,
    STATUS_SUCCEEDED,
    WARM_TTL_S,
    warm_key,
)
from bastion.errors import BastionError, InvalidInput
from bastion.monitoring.counting import Monitor
from bastion.queue import calls
from bastion.queue.calls import DeadLetters
from bastion.queue.consumer import Consumer, Outcome, out_of_memory
from bastion.queue.envelope import Job
from bastion.runtime.base import LoadedModel
from bastion.settings import Settings
from bastion.snapshot import Snapshot
from bastion.text.jobs import ATTENTION_MASK, TASK_GENERATION
from bastion.worker import evaluation, shadow, spans
from bastion.worker.batching import run_batch, run_each
from bastion.worker.generate import Generations
from bastion.worker.heartbeat import Heartbeat, TimeLimited
from bastion.worker.isolation import Child, ChildDied, run_isolated
from bastion.worker.models import ModelCache
from bastion.worker.spans import BatchSpans
from bastion.worker.text import EmbeddingModel, GenerationModel, UpstreamModel

log = logs.get("bastion.worker")

STORE_FULL_HOLD_S = 60.0  # how long refused outcomes are kept and retried before the jobs go back
STORE_FULL_BACKOFF_S = (0.25, 5.0)  # first and longest wait between tries
GENERATION_DRAIN_S = 30.0  # how long a stopping worker lets its running generations go on


class Worker:
    def __init__(self, settings: Settings, client: redis.Redis, cache: ModelCache, name: str) -> None:
        self.settings = settings
        self.client = client
        self.cache = cache
        self.name = name
        self.consumer = Consumer(
            client,
            name,
            result_ttl_s=settings.result_ttl_s,
            sync_result_ttl_s=settings.sync_result_ttl_s,
            floor_per_row=settings.cost_per_row_floor,
            result_cost_per_kib=settings.result_cost_per_kib,
            dead_letters=DeadLetters(
                settings.max_dead_letters, settings.dead_letter_max_age_s, settings.dead_letter_max_input_bytes
            ),
            max_stored_result_bytes=settings.max_stored_result_bytes,
            artifact_of=self._artifact_of if settings.decision_log else None,
        )
        self.monitor = Monitor(client, settings)
        self.snapshot = Snapshot.empty()
        self.models: list[str] = []
        self.shadowed: frozenset[str] = frozenset()  # models with shadow routes or shadow copies waiting
        self.stopping = False
        self._next_refresh = 0.0
        self._next_reclaim = 0.0
        self._next_prune = 0.0
        self._reported_warm: set[tuple[str, int]] = set()
        self.generations = Generations(client, settings, name)
        self._generation_models: frozenset[str] = frozenset()  # models whose routed versions generate
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]

    # lifecycle ---------------------------------------------------------------------------
    def stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        if not self.stopping:
            log.info("worker_stopping", worker=self.name, signal=signum)
        self.stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        self._pubsub.subscribe(SNAPSHOT_CHANNEL)
        while not self.stopping and not self.refresh(force=True):
            time.sleep(0.2)  # no snapshot published yet
        self._report_depth()
        log.info("worker_started", worker=self.name, models=self.models)
        # Jobs this consumer name had claimed before a crash come back first (counted as a
        # delivery, so a job that keeps killing its worker is dead-lettered, not replayed forever).
        recovered = False
        while not self.stopping:
            try:
                if not recovered:
                    self.reclaim(idle_ms=0, own=True)
                    recovered = True
                self.step()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis is away: nothing was acknowledged, so nothing is lost; retry.
                log.warning("redis_unavailable", worker=self.name, error_type=type(exc).__name__)
                time.sleep(0.5)
            except Exception as exc:
                # Unacknowledged jobs stay pending and come back through reclaim, counted.
                metrics.ERRORS.labels("worker", "loop").inc()
                log.error("worker_step_failed", worker=self.name, error_type=type(exc).__name__, exc_info=exc)
                time.sleep(0.5)
        self._drain_generations()
        self._pubsub.close()
        try:
            self.monitor.flush(force=True)
        except (redis.RedisError, OSError) as exc:  # Redis away at the end: those counts are lost
            log.warning("monitoring_flush_failed", worker=self.name, error_type=type(exc).__name__)
        log.info("worker_stopped", worker=self.name)

    def step(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh or self._pubsub.get_message(timeout=0.0) is not None:
            self.refresh()
            self._report_depth()
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(self.settings.visibility_timeout_s / 4, 0.05)
            self.reclaim()
        generating = self.generations.busy
        models = self.models
        if self.generations.full:  # at the bound: only other models' jobs are read meanwhile
            models = [m for m in models if m not in self._generation_models]
        jobs = self.consumer.read(
            models, self.settings.max_batch, block_ms=None if generating else 100, shadowed=self.shadowed
        )
        if jobs:
            if not generating and not any(self._generates(j) for j in jobs):
                self._fill(jobs)  # (never for a generation: its first token is not delayed)
            self.process(jobs)
        if self.generations.busy:
            self._finish(self.generations.step())
        self.monitor.flush()  # at most every monitoring_flush_s: one pipeline

    def _generates(self, job: Job) -> bool:
        info = self.snapshot.versions.get((job.model, job.version))
        return info is not None and info.text is not None and info.text.task == TASK_GENERATION

    def _drain_generations(self) -> None:
        """Stopping: let running generations end (up to ``max_job_s``), then end the rest as cancelled."""
        give_up = time.monotonic() + min(self.settings.max_job_s, GENERATION_DRAIN_S)
        while self.generations.busy:
            try:
                if time.monotonic() > give_up:
                    self._finish(self.generations.abandon())
                    return
                self._finish(self.generations.step())
            except (redis.RedisError, OSError) as exc:  # unacknowledged: redelivered later
                log.warning("generation_drain_failed", worker=self.name, error_type=type(exc).__name__)
                return

    def _fill(self, jobs: list[Job]) -> None:
        """Wait up to ``max_wait_ms`` for more jobs to fill the batch.

        Short waits poll without BLOCK: Redis checks blocked-client timeouts only on its
        server tick (``hz``, 100 ms by default), so ``BLOCK 1`` can take 100 ms.
        """
        wait_until = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(jobs) < self.settings.max_batch:
            more = self.consumer.read(
                self.models, self.settings.max_batch - len(jobs), block_ms=None, shadowed=self.shadowed
            )
            if more:
                jobs.extend(more)
                continue
            left = wait_until - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.0005))

    def _artifact_of(self, model: str, version: int) -> str:
        """The sha256 of the artifact that answers for (model, version), for the decision log."""
        info = self.snapshot.versions.get((model, version))
        return info.sha256 if info is not None else ""

    def refresh(self, force: bool = False) -> bool:
        self._next_refresh = time.monotonic() + self.settings.snapshot_refresh_s
        if not force and not self.snapshot.outdated(self.client):
            self._report_warm()  # the serial key names the snapshot held: nothing to fetch
            return True
        raw: Any = self.client.get(SNAPSHOT_KEY)
        if raw is None:
            return False
        snapshot = Snapshot.parse(raw)
        if snapshot.serial < self.snapshot.serial or (not force and snapshot.serial == self.snapshot.serial):
            # an older snapshot than the one held (a slow publisher's) is never applied
            self._report_warm()  # still alive, still warm
            return True
        self.snapshot = snapshot
        wanted = [m.strip() for m in self.settings.worker_models.split(",") if m.strip()]
        self.models = sorted(m for m in snapshot.models if not wanted or m in wanted)
        self.consumer.ensure_groups(self.models)
        self.shadowed = frozenset(m for m in self.shadowed if m in snapshot.models) | {
            m for m in self.models if snapshot.models[m].shadows
        }
        self.cache.sync(snapshot, self.models)
        self.generations.forget(self.cache.loaded_models())
        self._generation_models = frozenset(
            m
            for m in self.models
            if any(
                r.version.text is not None and r.version.text.task == TASK_GENERATION for r in snapshot.models[m].routes
            )
        )
        self._report_warm()
        return True

    def _report_warm(self) -> None:
        """Tell the control plane which versions this worker has loaded and warmed up."""
        loaded = self.cache.loaded_versions()
        pipe = self.client.pipeline(transaction=False)
        now = time.time()
        for model, version in loaded:
            pipe.zadd(warm_key(model, version), {self.name: now})
            pipe.expire(warm_key(model, version), WARM_TTL_S)
        for model, version in self._reported_warm - loaded:
            pipe.zrem(warm_key(model, version), self.name)
        pipe.execute()
        self._reported_warm = loaded

    def _report_depth(self) -> None:
        """Queue depths as metrics; and which models' shadow lanes to read (those with shadow
        routes, or with copies still waiting from a shadow route since removed)."""
        shadowed = {m for m in self.models if self.snapshot.models[m].shadows}
        for model, lane, depth in self.consumer.depths(self.models):
            metrics.QUEUE_DEPTH.labels(model, lane).set(depth)
            if lane == LANE_SHADOW and depth:
                shadowed.add(model)
        self.shadowed = frozenset(shadowed)

    def reclaim(self, idle_ms: int | None = None, own: bool = False) -> None:
        """Take back jobs idle past the visibility timeout (or, with ``own``, this consumer's own),
        one at a time, each claimed just before it runs alone: a redelivered job may be the one
        that killed its last worker, and then it takes down only itself, charging no other job a
        delivery. A job past ``max_deliveries`` is dead-lettered instead."""
        if idle_ms is None:
            idle_ms = int(self.settings.visibility_timeout_s * 1000)
        limit = self.settings.max_deliveries
        for entry in self.consumer.pending(self.models, idle_ms, only_consumer=self.name if own else None):
            if self.stopping:
                break
            job = self.consumer.claim(entry, idle_ms)
            if job is None:
                continue  # another worker took it first
            if entry.times >= limit:  # XPENDING counted the earlier deliveries; the claim is one more
                metrics.DEAD_LETTERED.labels(job.model).inc()
                log.warning(
                    "job_dead_lettered",
                    job_id=job.job_id,
                    model=job.model,
                    deliveries=entry.times,
                    trace_id=spans.trace_id(job),
                )
                self.consumer.dead_letter([job], limit)
                continue
            metrics.RECLAIMED.labels(job.model).inc()
            log.info(
                "job_reclaimed",
                job_id=job.job_id,
                model=job.model,
                deliveries=entry.times + 1,
                trace_id=spans.trace_id(job),
            )
            self.process([job], suspect=self.settings.isolate_redelivered)
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + min(60.0, self.settings.consumer_expiry_s / 2)
            removed = self.consumer.prune(self.models, self.settings.consumer_expiry_s)
            if removed:
                log.info("consumers_pruned", count=removed)

    # work --------------------------------------------------------------------------------
    def process(self, jobs: list[Job], suspect: bool = False) -> None:
        """Run and complete ``jobs``, keeping their claim alive while they run; jobs whose model
        call was stopped by the time limit, or whose process died, are released for redelivery
        (counted). ``suspect`` jobs (redelivered ones) run alone, each in a child process."""
        held = [*jobs, *self.generations.jobs()]  # generations running meanwhile keep their claim too
        with Heartbeat(self.consumer, held, self.settings.visibility_timeout_s, self.settings.max_job_s) as beat:
            released = self._process(jobs, beat, suspect)
        if released:
            log.warning("jobs_released", reason="time_limit", job_ids=[j.job_id for j in released][:20])
            self.consumer.release(released, int(self.settings.visibility_timeout_s * 1000) + 1)

    def _process(self, jobs: list[Job], beat: Heartbeat, suspect: bool = False) -> list[Job]:
        now_ms = int(time.time() * 1000)
        outcomes: list[Outcome] = []
        groups: dict[tuple[str, int], list[Job]] = defaultdict(list)
        for job in jobs:
            if job.evaluation:
                outcomes.append(self._evaluate(job))
            elif job.deadline_ms and job.deadline_ms < now_ms:
                # It never ran: its reserved cost goes back, and it teaches the price nothing.
                outcomes.append(
                    Outcome(job, STATUS_EXPIRED, error="the deadline passed before the job ran", measured_units=0.0)
                )
            else:
                groups[(job.model, job.version)].append(job)
        self._mark_running([j for group in groups.values() for j in group])
        if outcomes and tracing.ON:
            spans.expired([o for o in outcomes if o.status == STATUS_EXPIRED])
        self._finish(outcomes)
        released: list[Job] = []
        # Each model version's outcomes are stored as soon as it has run: if a later group kills
        # this worker, only that group's jobs come back.
        for (model, version), group in groups.items():
            if self._generates(group[0]):
                self._finish(self._start_generations(model, version, group))
                continue
            if not tracing.ON:
                self._finish(self._run_group(model, version, group, beat, released, suspect))
                continue
            batch = BatchSpans(model, version, group, self.name)
            done: list[Outcome] = []
            try:
                done = self._run_group(model, version, group, beat, released, suspect, batch)
                reply = batch.reply(len(done))
                try:
                    self._finish(done)
                finally:
                    reply.end()
            finally:
                batch.end(done, released)
        return released

    def _start_generations(self, model: str, version: int, jobs: list[Job]) -> list[Outcome]:
        """Hand generation jobs to the engine (``step`` runs them); the outcomes of those that cannot start."""
        try:
            loaded = self._load(model, version)
        except BastionError as exc:
            return [Outcome(j, STATUS_FAILED, error=exc.detail, measured_units=0.0) for j in jobs]
        if not isinstance(loaded, GenerationModel | UpstreamModel):
            return [Outcome(j, STATUS_FAILED, error="the version is not a generation model") for j in jobs]
        return self.generations.start(jobs, loaded, self.snapshot)

    def _mark_running(self, jobs: list[Job]) -> None:
        """'running' is only shown to the job's owner: a Redis out of memory does not stop the run."""
        try:
            self.consumer.mark_running(jobs)
        except redis.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            metrics.ERRORS.labels("worker", "store_full").inc()
            log.warning("job_store_full", action="jobs run without being marked running", count=len(jobs))

    def _finish(self, outcomes: list[Outcome]) -> None:
        """Store outcomes, then settle what was stored. Outcomes Redis refuses (out of memory) are
        tried again with a growing wait for up to ``STORE_FULL_HOLD_S`` (the heartbeat keeps the
        jobs' claim meanwhile); what is still refused then, or when the worker stops, stays
        pending, unacknowledged, and is redelivered later."""
        wait, give_up = STORE_FULL_BACKOFF_S[0], time.monotonic() + STORE_FULL_HOLD_S
        while outcomes:
            statuses = self.consumer.complete(outcomes)
            done = [o for o in outcomes if not o.refused]
            for outcome, stored in zip(outcomes, statuses, strict=True):
                if not outcome.refused:
                    metrics.JOBS.labels(outcome.job.model, stored).inc()
            self.monitor.finished([o for o in done if o.stored])
            try:
                self.consumer.settle(done)
                self._settle_tokens(done)
                self._record_shadows(done)
            except redis.ResponseError as exc:  # stored and acknowledged: only the correction is lost
                if not out_of_memory(exc):
                    raise
                metrics.ERRORS.labels("worker", "store_full").inc()
                log.warning("job_store_full", action="outcomes stored, cost not settled", count=len(done))
            outcomes = [o for o in outcomes if o.refused]
            if not outcomes:
                return
            metrics.ERRORS.labels("worker", "store_full").inc()
            if self.stopping or time.monotonic() + wait > give_up:
                pending = [o.job.job_id for o in outcomes][:20]
                log.warning("job_store_full", action="jobs left pending for redelivery", job_ids=pending)
                return
            log.warning("job_store_full", action="outcomes kept, retrying", count=len(outcomes), retry_s=wait)
            time.sleep(wait)
            wait = min(wait * 2, STORE_FULL_BACKOFF_S[1])

    def _settle_tokens(self, outcomes: list[Outcome]) -> None:
        """Give back what text jobs reserved beyond what they used (their first outcome only)."""
        settle = getattr(calls, "settle_tokens", None)  # (bastion.queue.calls; absent before token budgets)
        for o in outcomes:
            used = self.generations.used_tokens.pop(o.job.job_id, 0)
            if o.status != STATUS_SUCCEEDED and not self._generates(o.job):
                used = 0  # an embedding that failed was not served: all its tokens go back
            if settle is None or not o.settles or o.job.tokens <= 0:
                continue
            try:
                settle(self.client, o.job, used)
            except redis.RedisError as exc:
                if not isinstance(exc, redis.ResponseError) or not out_of_memory(exc):
                    raise
                metrics.ERRORS.labels("worker", "store_full").inc()
                log.warning("job_store_full", action="tokens not settled", job_id=o.job.job_id)

    def _evaluate(self, job: Job) -> Outcome:
        """Run a version on a holdout set (read from the artifact store, verified) and report metrics."""
        try:
            spec = evaluation.Spec.from_dict(orjson.loads(job.evaluation))
            loaded = self._load(job.model, job.version)
            found = holdout.decode(self.cache.store.open(spec.holdout))
            signature = self.snapshot.versions[(job.model, job.version)].signature
            report = evaluation.evaluate(loaded, signature, found, spec)
        except BastionError as exc:
            log.warning("evaluation_failed", job_id=job.job_id, model=job.model, version=job.version, reason=exc.detail)
            return Outcome(job, STATUS_FAILED, error=exc.detail)
        except Exception as exc:
            metrics.ERRORS.labels("worker", "evaluation").inc()
            log.warning("evaluation_failed", job_id=job.job_id, model=job.model, error_type=type(exc).__name__)
            return Outcome(job, STATUS_FAILED, error="the model could not run the holdout set")
        report["evaluated_by"] = self.name
        log.info("evaluation_done", job_id=job.job_id, model=job.model, version=job.version, rows=report["rows"])
        return Outcome(job, STATUS_SUCCEEDED, result=orjson.dumps(report))

    def _record_shadows(self, outcomes: list[Outcome]) -> None:
        """Shadow copies carry the answer the client got; compare and add to the version's totals."""
        totals: dict[tuple[str, int], list[float]] = {}
        for o in outcomes:
            if not o.job.compare or o.status != STATUS_SUCCEEDED or not o.settles:
                continue
            try:
                c = shadow.compare(o.job.compare, o.result)
            except BastionError:
                continue
            t = totals.setdefault((o.job.model, o.job.version), [0, 0, 0, 0.0, 0])
            t[0] += 1
            t[1] += c.rows
            t[2] += c.agree_rows
            t[3] += c.abs_diff_sum
            t[4] += c.values
        self.consumer.record_shadow(totals)

    def _run_group(
        self,
        model: str,
        version: int,
        jobs: list[Job],
        beat: Heartbeat,
        released: list[Job],
        suspect: bool = False,
        batch: BatchSpans | None = None,
    ) -> list[Outcome]:
        try:
            loaded = self._load(model, version)
        except BastionError as exc:
            return [Outcome(j, STATUS_FAILED, error=exc.detail) for j in jobs]
        if isinstance(loaded, EmbeddingModel):
            self._count_embedding_tokens(model, version, jobs)
        if suspect:
            return self._run_alone(loaded, jobs, beat, released, isolated=True)
        info = self.snapshot.versions.get((model, version))
        batchable = info is not None and info.signature.batchable
        outcomes: list[Outcome] = []
        size = self.settings.max_batch if batchable else 1
        for start in range(0, len(jobs), size):
            chunk = jobs[start : start + size]
            started = time.perf_counter()
            span = batch.model_call(len(chunk)) if batch is not None else None
            observe = self.monitor.observer(info, [j.role for j in chunk])  # (before the time limit starts)
            try:
                with beat.call(loaded):
                    results = run_batch(loaded, [j.blob for j in chunk], observe=observe)
                done = [Outcome(j, STATUS_SUCCEEDED, result=r) for j, r in zip(chunk, results, strict=True)]
            except TimeLimited:
                if span is not None:
                    span.fail("time limit")
                    span.end()
                if len(chunk) == 1:  # released: it comes back alone, counted
                    released.extend(chunk)
                    continue
                # One of them is a runaway: run each alone now (each watched), so the others are
                # answered without being charged a delivery; only the runaway is released.
                done = self._run_alone(loaded, chunk, beat, released)
            except Exception as exc:  # one bad job, or unsplittable outputs: run the jobs one by one
                if span is not None:
                    span.fail(f"batch failed ({type(exc).__name__}); jobs run one by one")
                    span.end()
                done = self._run_alone(loaded, chunk, beat, released)
            if span is not None:
                span.end()  # (a failed batch's span ended already: its jobs ran alone after it)
            elapsed = time.perf_counter() - started
            _share_cost(done, elapsed * 1000)
            outcomes += done
            metrics.INFERENCE_SECONDS.labels(model, str(version)).observe(elapsed)
            metrics.BATCH_JOBS.labels(model).observe(len(chunk))
        return outcomes

    def _count_embedding_tokens(self, model: str, version: int, jobs: list[Job]) -> None:
        """Each embedding job's tokens (its mask's ones): the usage its token budget settles."""
        for job in jobs:
            try:
                mask = codec.decode(job.blob).get(ATTENTION_MASK)
            except Exception:  # a malformed job fails when it runs; it used nothing
                mask = None
            if mask is not None and mask.dtype.kind in "iub":
                used = int(np.count_nonzero(mask))
                self.generations.used_tokens[job.job_id] = used
                metrics.TEXT_TOKENS.labels(model, str(version), "prompt").inc(used)

    def _load(self, model: str, version: int) -> LoadedModel:
        if (model, version) not in self.snapshot.versions:
            self.refresh(force=True)  # a version registered after our last snapshot
        return self.cache.get(self.snapshot, model, version)

    def _child_started(self, job: Job, child: Child, beat: Heartbeat) -> None:
        """Watch the child instead of the model; name its pid in the job's state (async jobs)."""
        beat.watch(child)
        self.consumer.mark_running([job], child_pid=child.pid)  # never recreates a state that expired

    def _run_alone(
        self, loaded: LoadedModel, jobs: list[Job], beat: Heartbeat, released: list[Job], isolated: bool = False
    ) -> list[Outcome]:
        done: list[Outcome] = []
        for job in jobs:
            started = time.perf_counter()
            one = self._run_one(loaded, job, beat, isolated)
            if one is not None and isolated:
                _share_cost([one], (time.perf_counter() - started) * 1000)
                one.ran = False  # its time includes forking a process: it settles, but teaches no price
            if one is None:
                released.append(job)
            else:
                done.append(one)
        return done

    def _run_one(self, loaded: LoadedModel, job: Job, beat: Heartbeat, isolated: bool = False) -> Outcome | None:
        """The job's outcome, or None when the time limit stopped it or its process died (to be
        released)."""
        try:
            with beat.call(loaded):
                if isolated:
                    result = run_isolated(loaded, job.blob, lambda child: self._child_started(job, child, beat))
                else:
                    result = run_each(loaded, job.blob)
            return Outcome(job, STATUS_SUCCEEDED, result=result)
        except TimeLimited:
            return None
        except ChildDied as exc:
            metrics.ERRORS.labels("worker", "job_process_died").inc()
            log.warning(
                "job_process_died", job_id=job.job_id, model=job.model, reason=str(exc), trace_id=spans.trace_id(job)
            )
            return None
        except InvalidInput as exc:
            return Outcome(job, STATUS_FAILED, error=exc.detail)
        except Exception as exc:
            metrics.ERRORS.labels("worker", "inference").inc()
            log.warning(
                "inference_failed",
                job_id=job.job_id,
                model=job.model,
                error_type=type(exc).__name__,
                trace_id=spans.trace_id(job),
            )
            return Outcome(job, STATUS_FAILED, error="the model could not run this input")


def _share_cost(outcomes: list[Outcome], elapsed_ms: float) -> None:
    """Split a model call's time over its jobs by rows: each job's measured compute units. Only
    answered jobs teach the price (a failing input may fail fast; it must not make rows cheap)."""
    rows = sum(max(o.job.rows, 1) for o in outcomes)
    for o in outcomes:
        o.measured_units = elapsed_ms * max(o.job.rows, 1) / rows
        o.ran = o.status == STATUS_SUCCEEDED
