"""Generation jobs: stepped together (continuous batching), streamed, cancellable, guarded.

A generation job joins its version's ``BatchedGeneration`` as soon as it is read (``add``); the
worker loop then calls ``step`` between its reads, without waiting for more jobs while any
generation runs, so generations already running keep stepping while new ones join. After every
step, ONE pipeline writes what the step produced and reads what it must know:

- for each streamed request (``stream``), its new chunk (``delta_fields``) to ``s:{job id}``
  (``MAXLEN ~`` the request's max tokens + 8, ``EXPIRE text_stream_ttl_s``); when it ends, its
  ``end_fields`` (or ``error_fields``). A non-streamed request writes nothing there: its answer is
  its stored outcome. A first chunk is written by the step that produced the first token;
- ``EXISTS x:{job id}`` for each running job: a set cancel flag ends that generation at the next
  step as ``cancelled`` (usage: the tokens produced so far); a job whose deadline passes ends so too;
- every third of the visibility timeout, the running jobs' claim (``XCLAIM … JUSTID``), so no
  other worker takes them while they run.

An ended generation comes back from ``step`` as an ``Outcome`` (``bastion.text.jobs.outputs``),
which the worker completes like any prediction (stored once, reply, ack, decision log); its used
tokens (prompt + completion) are in ``used_tokens`` for the token budget's settlement. The output
guards are ``worker.outguard``'s. No text is logged: ids and counts only.

An upstream version (``worker.text.UpstreamModel``) gets an ``UpstreamGeneration`` engine instead
of a ``BatchedGeneration`` (``bastion.runtime.upstream``: one streaming request per generation to
an OpenAI-compatible server, only one that ``upstream_hosts`` names), stepped the same way. While
only such engines are busy and nothing has arrived from their servers, ``step`` waits up to
``UPSTREAM_POLL_S`` for something to arrive (a chunk wakes it at once), so that the loop does not
spin on Redis while the servers think. A request that fails upstream fails its job alone, with the
engine's message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from bastion import codec, logs, metrics
from bastion.constants import CONSUMER_GROUP, STATUS_FAILED, STATUS_SUCCEEDED
from bastion.errors import BastionError, InvalidInput
from bastion.guards import Decision, GuardResult, Guards, parse_policy
from bastion.queue.consumer import Outcome
from bastion.queue.envelope import Job
from bastion.runtime.upstream import UpstreamGeneration
from bastion.settings import Settings
from bastion.snapshot import Snapshot
from bastion.text.batching import BatchedGeneration
from bastion.text.generation import Delta, SamplingParams
from bastion.text.jobs import (
    FINISH_CANCELLED,
    INPUT_IDS,
    Completion,
    GenerationRequest,
    cancel_key,
    delta_fields,
    end_fields,
    error_fields,
    outputs,
    stream_key,
)
from bastion.text.upstream import parse_hosts
from bastion.worker.outguard import Ending, OutputGuard
from bastion.worker.text import GenerationModel, UpstreamModel

log = logs.get("bastion.worker")

FAILED_MESSAGE = "the model failed while generating"
GUARD_FAILED = "the answer could not be checked by the model's output guards; it is not given"
INTERRUPTED = "the generation was interrupted (its worker stopped); please retry"
UPSTREAM_POLL_S = 0.01  # longest wait for an upstream's next chunk while nothing else runs


@dataclass
class _Running:
    job: Job
    engine: tuple[str, int, int]  # model, version, id of the loaded model
    request: GenerationRequest
    prompt_tokens: int
    guard: OutputGuard
    completion_tokens: int = 0
    cost_ms: float = 0.0
    stop: str | None = None  # why the worker ends it at the next step (cancelled, content_filter, length)
    streamed: bool = False  # a chunk was written already


class _Engine:
    def __init__(
        self,
        model: GenerationModel | UpstreamModel,
        max_batch: int,
        allowed: frozenset[str],
        arrived: threading.Event,
        max_s: float,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self._allowed, self._arrived, self._max_s = allowed, arrived, max_s
        self.batch = self._new()

    def _new(self) -> BatchedGeneration | UpstreamGeneration:
        model = self.model
        if isinstance(model, UpstreamModel):
            return UpstreamGeneration(
                model.upstream,
                model.tokenizer,
                model.config,
                allowed=self._allowed,
                max_batch=self.max_batch,
                arrived=self._arrived,
                max_duration_s=self._max_s,
            )
        return BatchedGeneration(model.decoder, model.tokenizer, model.config, max_batch=self.max_batch)

    @property
    def waits(self) -> bool:
        """Busy, but only waiting on a server with nothing arrived yet."""
        return isinstance(self.batch, UpstreamGeneration) and not self.batch.ready

    def reset(self) -> None:
        self.close()
        self.batch = self._new()

    def close(self) -> None:
        if isinstance(self.batch, UpstreamGeneration):
            self.batch.close()


class Generations:
    def __init__(self, client: redis.Redis, settings: Settings, consumer_name: str) -> None:
        self.client = client
        self.settings = settings
        self.consumer_name = consumer_name
        self.used_tokens: dict[str, int] = {}  # job id → tokens its generation used (settled by the worker)
        self._engines: dict[tuple[str, int, int], _Engine] = {}  # a reloaded version's old engine runs out
        self._running: dict[str, _Running] = {}
        self._guards: dict[str, Guards | None] = {}
        self._guards_serial = -1
        self._touch_every = max(settings.visibility_timeout_s / 3, 0.02)
        self._next_touch = 0.0
        self._arrived = threading.Event()  # set by an upstream engine's threads when a chunk arrives
        try:
            self._upstreams = parse_hosts(settings.upstream_hosts)
        except ValueError as exc:  # no upstream is reached on a setting that does not parse
            log.error("upstream_hosts_invalid", reason=str(exc))
            self._upstreams = frozenset()

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    def jobs(self) -> list[Job]:
        return [r.job for r in self._running.values()]

    @property
    def full(self) -> bool:
        return len(self._running) >= self.settings.generation_batch

    # joining ---------------------------------------------------------------------------------
    def start(self, jobs: list[Job], model: GenerationModel | UpstreamModel, snapshot: Snapshot) -> list[Outcome]:
        """Start the jobs' generations; the outcomes of those that cannot start.

        A streamed job whose stream exists already was started by a worker that died meanwhile
        (this is a redelivery): its client has seen part of an answer that cannot be continued, so
        it ends with an error entry and fails, rather than streaming a second answer after the first.
        """
        jobs = [j for j in jobs if j.job_id not in self._running]  # (one this worker runs already completes)
        streamed = [j for j in jobs if j.generation.get("stream") is True]
        pipe = self.client.pipeline(transaction=False)
        for job in streamed:
            pipe.exists(stream_key(job.job_id))
        began = {j.job_id for j, n in zip(streamed, pipe.execute() if streamed else [], strict=True) if n}
        out: list[Outcome] = []
        for job in jobs:
            if job.job_id in began:
                log.warning("generation_interrupted", job_id=job.job_id, model=job.model)
                self._refuse(job, True, INTERRUPTED)
                out.append(Outcome(job, STATUS_FAILED, error=INTERRUPTED, measured_units=0.0))
                continue
            refused = self.add(job, model, snapshot)
            if refused is not None:
                out.append(refused)
        return out

    def add(self, job: Job, model: GenerationModel | UpstreamModel, snapshot: Snapshot) -> Outcome | None:
        """Start ``job``'s generation; an ``Outcome`` at once when it cannot start (a bad request)."""
        if job.job_id in self._running:
            return None  # a redelivery of a job this worker is generating: that run completes it
        request: GenerationRequest | None = None
        try:
            request = GenerationRequest.from_member(job.generation)
            guards = self._guards_of(job.model, snapshot)
            prompt = _prompt(job.blob)
            limit = guards.policy.output.max_tokens if guards is not None else None
            params = SamplingParams(
                max_tokens=min(request.max_tokens, limit or request.max_tokens),
                temperature=request.temperature,
                top_p=request.top_p,
                seed=request.seed,
                stop=request.stop,
            )
            key = (job.model, job.version, id(model))
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = _Engine(
                    model, self.settings.generation_batch, self._upstreams, self._arrived, self.settings.max_job_s
                )
            running = _Running(job, key, request, len(prompt), OutputGuard(guards, request))
            engine.batch.add(job.job_id, prompt, params, cancelled=lambda: running.stop is not None)
        except BastionError as exc:
            self._refuse(job, request is not None and request.stream, exc.detail)
            return Outcome(job, STATUS_FAILED, error=exc.detail, measured_units=0.0)
        self._running[job.job_id] = running
        return None

    def _refuse(self, job: Job, stream: bool, message: str) -> None:
        if not stream:
            return
        pipe = self.client.pipeline(transaction=False)
        self._write(pipe, job.job_id, error_fields(message), 8)
        pipe.execute()

    def _guards_of(self, model: str, snapshot: Snapshot) -> Guards | None:
        """The model's output guards, built once per snapshot; fail closed on a policy that does not parse."""
        if snapshot.serial != self._guards_serial:
            self._guards, self._guards_serial = {}, snapshot.serial
        if model not in self._guards:
            routes = snapshot.models.get(model)
            found = routes.guards if routes is not None else None
            try:
                self._guards[model] = Guards.build(parse_policy(found)) if found else None
            except InvalidInput as exc:
                log.error("guard_policy_invalid", model=model, reason=exc.detail)
                raise InvalidInput("the model's guard policy is invalid; it is not served") from None
        return self._guards[model]

    # stepping --------------------------------------------------------------------------------
    def step(self) -> list[Outcome]:
        """One step of every busy engine, then one pipeline; the outcomes of the generations that ended."""
        now_ms = int(time.time() * 1000)
        for r in self._running.values():
            if r.stop is None and r.job.deadline_ms and r.job.deadline_ms < now_ms:
                r.stop = FINISH_CANCELLED  # nobody waits for it any more
        self._wait_upstream()
        pipe = self.client.pipeline(transaction=False)
        ended: list[Outcome] = []
        for key, engine in list(self._engines.items()):
            if engine.batch.busy:
                ended += self._step_engine(pipe, key, engine)
        self._exchange(pipe)
        return ended

    def _wait_upstream(self) -> None:
        """While only upstream engines are busy and none has news, wait a little for a chunk."""
        busy = [e for e in self._engines.values() if e.batch.busy]
        if busy and all(e.waits for e in busy) and all(r.stop is None for r in self._running.values()):
            self._arrived.wait(UPSTREAM_POLL_S)
        self._arrived.clear()  # (before the engines drain: what arrives from now on sets it again)

    def _step_engine(self, pipe: Any, key: tuple[str, int, int], engine: _Engine) -> list[Outcome]:
        members = [r for r in self._running.values() if r.engine == key]
        started = time.perf_counter()
        try:
            deltas = engine.batch.step()
        except BaseException as exc:  # the model (or a hostile tokenizer's panic) failed mid-step
            if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
            metrics.ERRORS.labels("worker", "inference").inc()
            log.warning("generation_failed", model=key[0], version=key[1], error_type=type(exc).__name__)
            engine.reset()  # every generation of this engine fails: its batch state is lost
            return [self._fail(pipe, r, FAILED_MESSAGE) for r in members]
        share = (time.perf_counter() - started) * 1000 / max(len(members), 1)
        for r in members:
            r.cost_ms += share
        ended: list[Outcome] = []
        for job_id, delta in deltas:
            try:
                ended += self._apply(pipe, job_id, delta)
            except Exception as exc:  # a guard failed on this answer: this generation alone fails
                failing = self._running.get(str(job_id))
                metrics.ERRORS.labels("worker", "output_guard").inc()
                log.warning("output_guard_failed", job_id=str(job_id), error_type=type(exc).__name__)
                if failing is not None:
                    failing.stop = FINISH_CANCELLED  # the engine drops its row at the next step
                    ended.append(self._fail(pipe, failing, GUARD_FAILED))
        return ended

    def _exchange(self, pipe: Any) -> None:
        """The step's one round trip: its writes, every running job's cancel flag, the claims."""
        checks = [r for r in self._running.values() if r.stop is None]
        first_check = len(pipe.command_stack)
        for r in checks:
            pipe.exists(cancel_key(r.job.job_id))
        if self._running and time.monotonic() >= self._next_touch:
            self._next_touch = time.monotonic() + self._touch_every
            self._touch(pipe)
        if not pipe.command_stack:
            return
        replies = pipe.execute(raise_on_error=False)
        for r, flag in zip(checks, replies[first_check : first_check + len(checks)], strict=True):
            if isinstance(flag, int) and flag > 0:
                r.stop = FINISH_CANCELLED
        errors = [e for e in replies if isinstance(e, redis.RedisError)]
        if errors:
            metrics.ERRORS.labels("worker", "generation_stream").inc()
            log.warning("generation_stream_write_failed", count=len(errors), error_type=type(errors[0]).__name__)

    def forget(self, loaded: Mapping[tuple[str, int], object]) -> None:
        """Drop the idle engines of models no longer loaded (unloaded, or loaded anew)."""
        for key in [k for k, e in self._engines.items() if not e.batch.busy and loaded.get(k[:2]) is not e.model]:
            self._engines.pop(key).close()

    def _touch(self, pipe: Any) -> None:
        streams: dict[str, list[str]] = {}
        for r in self._running.values():
            streams.setdefault(r.job.stream, []).append(r.job.entry_id)
        for stream, ids in streams.items():
            pipe.xclaim(stream, CONSUMER_GROUP, self.consumer_name, 0, ids, justid=True)

    def _apply(self, pipe: Any, job_id: Hashable, delta: Delta) -> list[Outcome]:
        r = self._running.get(str(job_id))
        if r is None:
            return []
        r.completion_tokens += len(delta.token_ids)
        if delta.usage is not None:
            r.completion_tokens = delta.usage.completion_tokens
        if delta.error is not None:  # this generation alone failed (an upstream's error)
            return [self._fail(pipe, r, delta.error)]
        piece, verdict = r.guard.feed(delta.text)
        if piece and r.request.stream:
            self._chunk(pipe, r, piece)
        if verdict is not None and r.stop is None:
            r.stop = verdict
        if delta.finish_reason is None:
            return []
        finish = r.stop if r.stop is not None and delta.finish_reason == FINISH_CANCELLED else delta.finish_reason
        if verdict is not None:
            finish = verdict
        return [self._end(pipe, r, r.guard.finish(finish, r.completion_tokens))]

    def _chunk(self, pipe: Any, r: _Running, text: str) -> None:
        if not r.streamed:
            r.streamed = True
            if r.job.created_ms:
                metrics.TIME_TO_FIRST_TOKEN.labels(r.job.model).observe(
                    max(time.time() * 1000 - r.job.created_ms, 0) / 1000
                )
        self._write(pipe, r.job.job_id, delta_fields(text, r.completion_tokens), r.request.max_tokens + 8)

    def _write(self, pipe: Any, job_id: str, fields: dict[str, str], maxlen: int) -> None:
        key = stream_key(job_id)
        pipe.xadd(key, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        pipe.expire(key, self.settings.text_stream_ttl_s)

    def _end(self, pipe: Any, r: _Running, ending: Ending) -> Outcome:
        job = r.job
        del self._running[job.job_id]
        self._record(job, ending.results)
        metrics.TEXT_TOKENS.labels(job.model, str(job.version), "prompt").inc(r.prompt_tokens)
        metrics.TEXT_TOKENS.labels(job.model, str(job.version), "completion").inc(r.completion_tokens)
        self.used_tokens[job.job_id] = r.prompt_tokens + r.completion_tokens
        maxlen = r.request.max_tokens + 8
        if r.request.stream:
            if ending.tail:
                self._chunk(pipe, r, ending.tail)
            self._write(pipe, job.job_id, end_fields(ending.finish, r.prompt_tokens, r.completion_tokens), maxlen)
        log.info(
            "generation_done",
            job_id=job.job_id,
            model=job.model,
            version=job.version,
            finish=ending.finish,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
        )
        completion = Completion(ending.text, r.prompt_tokens, r.completion_tokens, ending.finish)
        outcome = Outcome(job, STATUS_SUCCEEDED, result=codec.encode(outputs(completion)), measured_units=r.cost_ms)
        outcome.ran = True
        outcome.guards = [result.to_dict() for result in ending.results]
        return outcome

    def _fail(self, pipe: Any, r: _Running, message: str) -> Outcome:
        del self._running[r.job.job_id]
        self.used_tokens[r.job.job_id] = r.prompt_tokens + r.completion_tokens
        if r.request.stream:
            self._write(pipe, r.job.job_id, error_fields(message), r.request.max_tokens + 8)
        return Outcome(r.job, STATUS_FAILED, error=message, measured_units=r.cost_ms)

    def _record(self, job: Job, results: list[GuardResult]) -> None:
        for result in results:
            metrics.GUARD_DECISIONS.labels(job.model, result.guard, str(result.decision)).inc()
            metrics.GUARD_SECONDS.labels(result.guard).observe(result.latency_us / 1e6)
            if result.guard == "pii_out" and result.decision is Decision.REDACT:
                for kind, count in result.counts.items():
                    metrics.PII_REDACTED.labels(job.model, "pii_out", kind).inc(count)
        refused = [r.guard for r in results if r.decision is not Decision.ALLOW]
        if refused:
            log.info("output_guards", job_id=job.job_id, model=job.model, guards=refused)

    def abandon(self) -> list[Outcome]:
        """End every generation now as cancelled (the worker is stopping and cannot wait)."""
        for r in self._running.values():
            r.stop = FINISH_CANCELLED
        return self.step()


def _prompt(blob: bytes) -> list[int]:
    try:
        found = codec.decode(blob)
    except BastionError:
        raise
    except Exception as exc:
        raise InvalidInput("the job's tensors do not decode") from exc
    ids = found.get(INPUT_IDS)
    if ids is None or ids.ndim != 2 or ids.shape[0] != 1 or ids.dtype.kind not in "iu":
        raise InvalidInput(f"a generation job carries {INPUT_IDS!r} as integers of shape [1, n]")
    return [int(i) for i in np.asarray(ids, dtype=np.int64)[0]]
