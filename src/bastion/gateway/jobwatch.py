"""What a gateway's open job event streams wait on: one subscription, one timer, for all of them.

Guarantees:

- A stream is woken when its job's status may have changed: on a notice on ``jobs:events``
  (workers publish an async job's id when it starts and when its outcome is stored), after every
  (re)subscription (a notice may have been missed while the connection was down), and when the
  gateway's periodic slot refresh (``streams.refresh``, one script call per ``REFRESH_S`` for all
  streams) reads a status other than the one the stream last sent. No stream polls Redis itself:
  idle streams cost one script call per gateway every ``REFRESH_S``, whatever their number.
- A stream is woken, within ``CHECK_S``, when its credential no longer authenticates against the
  gateway's current snapshot (revoked, deleted, expired, its scope or tenant gone); the stream
  checks that itself before it sends anything, so a revoked key is never sent a result.
- A stream whose slots lapsed (the refresh could not reach Redis for a slot's lifetime) or whose
  gateway is draining is ended.
- At stop, every open stream is ended and its slots given back: the watch waits (at most
  ``STOP_WAIT_S`` each) for the streams to end and then for the releases; slots of a stream that
  did not end in time lapse by themselves.
- Waiters are kept only while their stream is open (a dict of job id to the streams on it), so
  memory is bounded by the open streams, which the caps bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bastion import logs
from bastion.constants import JOB_EVENTS_CHANNEL
from bastion.gateway import streams
from bastion.gateway.channel import ChannelWatcher
from bastion.gateway.snapshots import SnapshotWatcher
from bastion.gateway.streams import Slot
from bastion.snapshot import KeyInfo, Snapshot

log = logs.get("bastion.gateway.jobwatch")

CHECK_S = 1.0  # how often open streams' credentials are checked against the snapshot (in memory)
STOP_WAIT_S = 2.0  # at stop: how long to wait for the open streams to end, then for their slots back


@dataclass(eq=False)
class Watch:
    """One open stream as the watch sees it; the stream's own loop reads and clears the flags."""

    job_id: str
    key: KeyInfo
    digest: str  # of the credential presented (an API key's digest, as the snapshot holds it)
    scopes: tuple[str, ...]
    slot: Slot | None = None
    status: str = ""  # the last status the stream sent
    job_changed: bool = False  # re-read the job's state
    ended: str | None = None  # why the gateway ends the stream: 'lapsed' | 'closing'
    disconnected: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def authorized(self, snapshot: Snapshot, now: float) -> bool:
        """Whether the stream's credential still authenticates, with its scope, for its tenant."""
        info = snapshot.keys.get(self.digest)
        if info is not None and info.id == self.key.id:  # an API key: as the snapshot holds it now
            return info.tenant == self.key.tenant and info.live(now) and not info.scopes.isdisjoint(self.scopes)
        if self.key.id.startswith("jwt-"):  # a JWT: its tenant must still be registered, its exp not passed
            return self.key.tenant in snapshot.tenants and self.key.live(now)
        return False  # the key is gone from the snapshot: revoked or deleted

    def poke(self, *, job: bool = False) -> None:
        if job:
            self.job_changed = True
        self.wake.set()

    async def wait(self, timeout_s: float) -> None:
        """Until poked or ``timeout_s`` passes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self.wake.wait()
        self.wake.clear()


class JobWatch:
    def __init__(
        self,
        redis: Any,
        snapshots: SnapshotWatcher,
        draining: Callable[[], bool],
        *,
        check_s: float = CHECK_S,
        refresh_s: float = streams.REFRESH_S,
    ) -> None:
        self.redis = redis
        self.snapshots = snapshots
        self.draining = draining
        self.check_s = check_s
        self.refresh_s = refresh_s
        self._by_job: dict[str, set[Watch]] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._gone = asyncio.Event()  # set while no stream is open
        self._gone.set()
        self._task: asyncio.Task[None] | None = None
        self._channel = ChannelWatcher(
            redis, JOB_EVENTS_CHANNEL, on_connect=self._resubscribed, on_tick=self._notice, idle_s=60.0
        )

    @property
    def open(self) -> int:
        return sum(len(w) for w in self._by_job.values())

    async def start(self) -> None:
        await self._channel.start()
        self._task = asyncio.create_task(self._timer())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self._channel.stop()
        for watch in self._watches():
            watch.ended = "closing"
            watch.poke()
        if self._by_job:  # the streams end (and ``remove`` themselves) on their next turn: wait for it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAIT_S):
                    await self._gone.wait()
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=STOP_WAIT_S)

    def add(self, watch: Watch) -> None:
        self._by_job.setdefault(watch.job_id, set()).add(watch)
        self._gone.clear()

    def remove(self, watch: Watch) -> None:
        """Forget the stream and give its slots back (in the background: this runs on every way out,
        cancellation included)."""
        found = self._by_job.get(watch.job_id)
        if found is not None:
            found.discard(watch)
            if not found:
                del self._by_job[watch.job_id]
                if not self._by_job:
                    self._gone.set()
        if watch.slot is not None:
            slot, watch.slot = watch.slot, None
            task = asyncio.get_running_loop().create_task(self._give_back(slot))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def _give_back(self, slot: Slot) -> None:
        try:
            await streams.give_back(self.redis, slot)
        except Exception as exc:  # the slots lapse by themselves
            log.warning("stream_slot_release_failed", job_id=slot.job_id, error_type=type(exc).__name__)

    def _watches(self) -> list[Watch]:
        return [w for found in self._by_job.values() for w in found]

    async def _notice(self, message: dict[str, Any] | None) -> None:
        if message is None:
            return
        data = message.get("data")
        job_id = data.decode(errors="replace") if isinstance(data, bytes) else str(data)
        for watch in self._by_job.get(job_id.strip(), ()):
            watch.poke(job=True)

    async def _resubscribed(self) -> None:
        for watch in self._watches():  # a notice may have been missed while unsubscribed
            watch.poke(job=True)

    async def _timer(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            await asyncio.sleep(self.check_s)
            self.check_credentials()
            if loop.time() - refreshed >= self.refresh_s:
                refreshed = loop.time()
                try:
                    await self.refresh()
                except Exception as exc:  # Redis away: the next round tries again; slots lapse meanwhile
                    log.warning("stream_refresh_failed", streams=self.open, error_type=type(exc).__name__)

    def check_credentials(self) -> None:
        """Wake every stream whose credential no longer authenticates; end all when draining."""
        snapshot, now, closing = self.snapshots.current, time.time(), self.draining()
        for watch in self._watches():
            if closing:
                watch.ended = "closing"
                watch.poke()
            elif not watch.authorized(snapshot, now):
                watch.poke()

    async def refresh(self) -> None:
        """Refresh every open stream's slots and wake those whose job status moved (one call)."""
        held = [(w, w.slot) for w in self._watches() if w.slot is not None]
        if not held:
            return
        found = await streams.refresh(self.redis, [slot for _, slot in held])
        for (watch, _), (status, live) in zip(held, found, strict=True):
            if not live:
                watch.ended = "lapsed"
                watch.poke()
            elif status != watch.status:
                watch.poke(job=True)
