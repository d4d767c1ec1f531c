"""The worker's spans for one model version's batch, while tracing is on (``bastion.tracing``).

- ``batch {model}`` (CONSUMER): the whole batch, a root linked to each job's trace (its
  envelope's ``tp``: the gateway's request span), with two kinds of children: ``model {model}``
  for each model call (one per chunk of ``max_batch`` jobs, or one per job run alone) and
  ``reply`` for storing the outcomes (the replies, the decision-log events).
- ``job {model}`` (CONSUMER), one per job: a child of the job's gateway span, so each request's
  trace reaches the worker with a parent link; it links back to the batch and says how long the
  job waited in the queue and how it ended. Its ``traceparent`` replaces the job's before the
  outcome is stored, so the decision-log event (and the control plane's span that logs it)
  continues from it. A job dropped unrun (its deadline passed in the queue) gets its job span too
  (``expired``), with status ERROR.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from bastion import tracing
from bastion.constants import STATUS_SUCCEEDED
from bastion.queue.consumer import Outcome
from bastion.queue.envelope import Job


def _job_span(
    job: Job,
    parent: tracing.Parent | None,
    now_ns: int,
    extra: dict[str, tracing.Value],
    links: Sequence[tracing.Parent] = (),
) -> tracing.Span:
    """A job's span, in the job's trace (a child of its gateway span when it carried one)."""
    attributes: dict[str, tracing.Value] = {"bastion.job_id": job.job_id, **extra}
    if job.created_ms:
        attributes["bastion.queued_ms"] = max(0, now_ns // 1_000_000 - job.created_ms)
    return tracing.start(
        f"job {job.model}",
        parent,
        kind=tracing.CONSUMER,
        attributes=attributes,
        links=links,
        start_ns=now_ns,
        remote=parent is not None,
    )


def expired(outcomes: list[Outcome]) -> None:
    """A span for each job dropped unrun (its deadline passed in the queue), in its own trace."""
    now_ns = time.time_ns()
    for outcome in outcomes:
        job = outcome.job
        span = _job_span(job, tracing.parse(job.traceparent), now_ns, {"bastion.status": outcome.status})
        span.fail(outcome.error or outcome.status)
        span.end(now_ns)


def trace_id(job: Job) -> str | None:
    """The trace id of the job's ``traceparent`` (for its log lines), None without a valid one."""
    found = tracing.parse(job.traceparent)
    return f"{found[0]:032x}" if found is not None else None


class BatchSpans:
    def __init__(self, model: str, version: int, jobs: list[Job], worker: str) -> None:
        now_ns = time.time_ns()
        parents = [tracing.parse(job.traceparent) for job in jobs]
        self.model = model
        self.batch = tracing.start(
            f"batch {model}",
            kind=tracing.CONSUMER,
            attributes={
                "bastion.model": model,
                "bastion.version": version,
                "bastion.worker": worker,
                "bastion.batch.jobs": len(jobs),
            },
            links=[p for p in parents if p is not None],
            start_ns=now_ns,
        )
        link = [self.batch.context]
        self.jobs: dict[str, tracing.Span] = {}
        for job, parent in zip(jobs, parents, strict=True):
            span = _job_span(job, parent, now_ns, {"bastion.role": job.role}, link)
            job.traceparent = span.traceparent  # the decision-log event continues from the worker's span
            self.jobs[job.job_id] = span

    def model_call(self, jobs: int) -> tracing.Span:
        return tracing.start(f"model {self.model}", self.batch.context, attributes={"bastion.batch.jobs": jobs})

    def reply(self, outcomes: int) -> tracing.Span:
        return tracing.start("reply", self.batch.context, attributes={"bastion.outcomes": outcomes})

    def end(self, outcomes: list[Outcome], released: list[Job]) -> None:
        """End every job's span with its outcome (released jobs: 'released'), then the batch's."""
        end_ns = time.time_ns()
        for outcome in outcomes:
            span = self.jobs.pop(outcome.job.job_id, None)
            if span is None:
                continue
            span.attributes["bastion.status"] = outcome.status
            if outcome.status != STATUS_SUCCEEDED:
                span.fail(outcome.error or outcome.status)
            span.end(end_ns)
        for job in released:
            span = self.jobs.pop(job.job_id, None)
            if span is not None:
                span.attributes["bastion.status"] = "released"
                span.end(end_ns)
        for span in self.jobs.values():  # refused by a full store: left pending, redelivered
            span.attributes["bastion.status"] = "pending"
            span.end(end_ns)
        self.jobs.clear()
        self.batch.end(end_ns)
