"""The decision log's backlog, as the gateway sees it: new work waits while evidence piles up.

Every decision's event waits on the ``audit`` stream until the control plane has appended it to
the log (and deleted it from the stream), so the stream's length is the backlog. When it passes
``audit_max_backlog`` - the control plane is down or far behind - the gateway answers 503 to new
predictions and jobs instead of taking decisions it might not be able to record: evidence is
never dropped, and Redis never fills with it. The length is read once per ``EVERY_S`` by a
background task, never on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib

from redis.exceptions import RedisError

from bastion import logs
from bastion.constants import AUDIT_STREAM
from bastion.errors import Unavailable

log = logs.get("bastion.gateway.evidence")
EVERY_S = 0.5


class Backlog:
    def __init__(self, redis: object, limit: int, enabled: bool = True) -> None:
        self.redis = redis
        self.limit = limit
        self.enabled = enabled
        self.waiting = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def full(self) -> bool:
        return self.enabled and self.waiting > self.limit

    def check(self) -> None:
        """Refuse new work (503) while the decision log is behind by more than the limit."""
        if self.full:
            raise Unavailable(
                f"the decision log is {self.waiting} events behind (limit {self.limit}); no new work is taken until "
                "it catches up; retry shortly",
                retry_after=1,
            )

    async def start(self) -> None:
        if self.enabled:
            await self.read()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read(self) -> None:
        was_full = self.full
        with contextlib.suppress(RedisError, OSError):  # Redis away: the request path says so itself
            self.waiting = int(await self.redis.xlen(AUDIT_STREAM))  # type: ignore[attr-defined]
        if self.full != was_full:
            log.warning("audit_backlog", waiting=self.waiting, limit=self.limit, refusing=self.full)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(EVERY_S)
            await self.read()
