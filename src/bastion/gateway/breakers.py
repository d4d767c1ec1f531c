"""Circuit breakers per (model, version), held by each gateway process.

closed
    Calls pass. Each counted outcome (ok, failed, slow) enters a window of the last
    ``window`` calls; once ``min_calls`` are in it, a failed share of ``failure_rate`` or a
    slow share of ``slow_rate`` opens the breaker.
open
    No call passes for ``open_s``: callers get the deployment's fallback or a fast 503.
half-open
    Up to ``probes`` calls pass, one at a time; the rest are diverted as when open. A failed
    or slow probe opens the breaker again; ``probes`` successful ones close it (window cleared).

What counts: a worker's failure is a failure; a call slower than ``slow_s`` is slow; a caller's
deadline that passed counts as slow only when it was at least ``slow_s`` (a client with a
1 ms timeout cannot open a breaker for everyone). Refusals before the job ran (bad input,
budgets, a full queue, Redis away) are not the version's fault and are not counted.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from bastion import logs, metrics
from bastion.settings import Settings

log = logs.get("bastion.gateway")

PROBE_LOST_S = 60.0  # a probe not handed back by then (a bug, never a normal path) is written off


class State(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(Enum):
    OK = "ok"
    FAILED = "failed"
    SLOW = "slow"
    TIMEOUT = "timeout"  # the caller's deadline passed: slow when the deadline was at least slow_s
    IGNORED = "ignored"  # refused before it ran: says nothing about the version


@dataclass(frozen=True, slots=True)
class Policy:
    window: int = 20
    min_calls: int = 10
    failure_rate: float = 0.5
    slow_rate: float = 0.8
    slow_s: float = 5.0
    open_s: float = 5.0
    probes: int = 3

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            s.breaker_window,
            min(s.breaker_min_calls, s.breaker_window),
            s.breaker_failure_rate,
            s.breaker_slow_rate,
            s.breaker_slow_s,
            s.breaker_open_s,
            s.breaker_probes,
        )

    def judge(self, outcome: Outcome, elapsed_s: float) -> Outcome:
        """An ``OK`` slower than ``slow_s`` is ``SLOW``; a ``TIMEOUT`` is ``SLOW`` or ``IGNORED``."""
        if outcome is Outcome.OK and elapsed_s >= self.slow_s:
            return Outcome.SLOW
        if outcome is Outcome.TIMEOUT:
            return Outcome.SLOW if elapsed_s >= self.slow_s else Outcome.IGNORED
        return outcome


@dataclass(slots=True)
class Permit:
    """A call let through by a breaker; hand it back with ``Breakers.record``."""

    breaker: Breaker
    probe: bool
    started: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class Breaker:
    model: str
    version: int
    policy: Policy
    state: State = State.CLOSED
    window: deque[Outcome] = field(default_factory=deque)
    counts: dict[Outcome, int] = field(default_factory=dict)  # outcomes in the window, by kind
    opened_at: float = 0.0
    probe_since: float | None = None  # when the probe in flight was let through
    probes_ok: int = 0

    def allow(self, now: float) -> Permit | None:
        if self.state is State.OPEN:
            if now - self.opened_at < self.policy.open_s:
                return None
            self._move(State.HALF_OPEN)
        if self.state is State.HALF_OPEN:
            if self.probe_since is not None and now - self.probe_since < PROBE_LOST_S:
                return None
            self.probe_since = now
            return Permit(self, probe=True, started=now)
        return Permit(self, probe=False)

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.policy.open_s - (now - self.opened_at)))

    def record(self, permit: Permit, outcome: Outcome, now: float) -> None:
        if permit.probe:
            self.probe_since = None
            if self.state is not State.HALF_OPEN or outcome is Outcome.IGNORED:
                return
            if outcome is Outcome.OK:
                self.probes_ok += 1
                if self.probes_ok >= self.policy.probes:
                    self._clear()
                    self._move(State.CLOSED)
            else:
                self._open(now)
            return
        if self.state is not State.CLOSED or outcome is Outcome.IGNORED:
            return  # a call let through before the breaker opened: its outcome is old news
        window, counts = self.window, self.counts
        window.append(outcome)
        counts[outcome] = counts.get(outcome, 0) + 1
        if len(window) > self.policy.window:
            gone = window.popleft()
            counts[gone] -= 1
        size = len(window)
        if size < self.policy.min_calls:
            return
        failed = counts.get(Outcome.FAILED, 0) / size
        slow = counts.get(Outcome.SLOW, 0) / size
        if failed >= self.policy.failure_rate or slow >= self.policy.slow_rate:
            self._open(now)

    def _clear(self) -> None:
        self.window.clear()
        self.counts.clear()

    def _open(self, now: float) -> None:
        self.opened_at = now
        self._clear()
        self._move(State.OPEN)

    def _move(self, to: State) -> None:
        if to is self.state:
            return
        log.warning("breaker_" + to.name.lower(), model=self.model, version=self.version, was=self.state.name.lower())
        self.state = to
        self.probes_ok = 0
        version = str(self.version)
        metrics.BREAKER_STATE.labels(self.model, version).set(to.value)
        metrics.BREAKER_TRANSITIONS.labels(self.model, version, to.name.lower()).inc()


class Breakers:
    """All of one gateway's breakers, created on first use."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._breakers: dict[tuple[str, int], Breaker] = {}

    def get(self, model: str, version: int) -> Breaker:
        key = (model, version)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = Breaker(model, version, self.policy)
            metrics.BREAKER_STATE.labels(model, str(version)).set(0)
        return breaker

    def record(self, permit: Permit | None, outcome: Outcome, elapsed_s: float | None = None) -> None:
        """Hand a permit back; the call took ``elapsed_s`` (unset: since the permit's ``started``,
        which the pipeline sets when the job is queued)."""
        if permit is None:
            return
        now = time.monotonic()
        took = now - permit.started if elapsed_s is None else elapsed_s
        permit.breaker.record(permit, self.policy.judge(outcome, took), now)
