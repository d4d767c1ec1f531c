"""Keep the claim on jobs alive while they run, and stop a model call that runs too long.

Heartbeat: without it, another worker would reclaim a long job after ``visibility_timeout_s``
and run it a second time. While a batch runs, a background thread touches its entries (resets
their idle time) every third of the visibility timeout; it stops when the batch is completed.
A worker that dies stops touching, so its jobs are still reclaimed as before.

Watchdog: the same thread watches each model call. A call still running after ``max_job_s``
(a runaway input, a hung model) is terminated through the runtime and raises ``TimeLimited``;
the worker releases that call's jobs for redelivery, counted, so a job that does it every time
is dead-lettered after ``max_deliveries`` and the worker goes on with other jobs. The stop is
repeated on every tick while the call runs. A call that
ignores termination for ``exit_grace_s`` more ends the worker process (``bastion up`` starts
it again); its jobs come back the same way.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Protocol

from bastion import logs, metrics
from bastion.queue.consumer import Consumer
from bastion.queue.envelope import Job

log = logs.get("bastion.worker")


class Stoppable(Protocol):
    def terminate(self) -> None: ...


class TimeLimited(Exception):
    """The model call ran past ``max_job_s`` and was terminated."""


class Heartbeat:
    def __init__(
        self,
        consumer: Consumer,
        jobs: list[Job],
        visibility_timeout_s: float,
        max_job_s: float = 600.0,
        exit_grace_s: float = 10.0,
    ) -> None:
        self.consumer = consumer
        self.jobs = jobs
        self.max_job_s = max_job_s
        self.exit_grace_s = exit_grace_s
        self.interval = min(max(visibility_timeout_s / 3, 0.02), max(max_job_s / 4, 0.01))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._lock = threading.Lock()
        self._target: Stoppable | None = None
        self._deadline = 0.0
        self._terminated = False
        self._stopped_at = 0.0

    def __enter__(self) -> Heartbeat:
        if self.jobs:
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def watch(self, target: Stoppable) -> None:
        """Stop ``target`` instead (a child process that now runs the call)."""
        with self._lock:
            self._target = target

    @contextlib.contextmanager
    def call(self, model: Stoppable) -> Iterator[None]:
        """Watch one model call; raise ``TimeLimited`` if the watchdog had to stop it."""
        with self._lock:
            self._target, self._deadline, self._terminated = model, time.monotonic() + self.max_job_s, False
        try:
            yield
        except Exception as exc:
            if self._terminated:
                raise TimeLimited(f"the model call ran past {self.max_job_s:g} s and was stopped") from exc
            raise
        finally:
            with self._lock:
                self._target = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._watch()
            try:
                self.consumer.touch(self.jobs)
            except Exception as exc:  # Redis away: the jobs may be reclaimed; they still finish once
                metrics.ERRORS.labels("worker", "heartbeat").inc()
                log.warning("heartbeat_failed", error_type=type(exc).__name__)

    def _watch(self) -> None:
        with self._lock:
            now = time.monotonic()
            target = self._target
            if target is None or now < self._deadline:
                return
            if not self._terminated:
                self._terminated, self._stopped_at = True, now
                metrics.ERRORS.labels("worker", "job_time_limit").inc()
                log.warning(
                    "job_time_limit_exceeded", max_job_s=self.max_job_s, job_ids=[j.job_id for j in self.jobs][:20]
                )
            # Told again on every tick while the call still runs: a runtime clears its stop flag
            # when a run starts, so a call that began after the first word (its thread held up
            # between the watch and the run) would otherwise run on.
            target.terminate()
            ignored = now - self._stopped_at  # (the grace counts from the first stop, however long a tick is)
        if ignored >= self.exit_grace_s:
            log.error("model_call_unstoppable", action="worker exits; its jobs are redelivered, counted")
            sys.stderr.flush()
            os._exit(70)  # EX_SOFTWARE: the call ignored termination; only the process can end it
