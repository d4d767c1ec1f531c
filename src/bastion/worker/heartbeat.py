"""Keep the claim on jobs alive while they run longer than the visibility timeout.

Without it, another worker would reclaim a long job after ``visibility_timeout_s`` and run it a
second time. While a batch runs, a background thread touches its entries (resets their idle
time) every third of the visibility timeout; it stops when the batch is completed. A worker that
dies stops touching, so its jobs are still reclaimed as before.
"""

from __future__ import annotations

import threading
from types import TracebackType

from bastion import logs, metrics
from bastion.queue.consumer import Consumer
from bastion.queue.protocol import Job

log = logs.get("bastion.worker")


class Heartbeat:
    def __init__(self, consumer: Consumer, jobs: list[Job], visibility_timeout_s: float) -> None:
        self.consumer = consumer
        self.jobs = jobs
        self.interval = max(visibility_timeout_s / 3, 0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

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

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.consumer.touch(self.jobs)
            except Exception as exc:  # Redis away: the jobs may be reclaimed; they still finish once
                metrics.ERRORS.labels("worker", "heartbeat").inc()
                log.warning("heartbeat_failed", error_type=type(exc).__name__)
