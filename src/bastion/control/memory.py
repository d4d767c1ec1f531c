"""The control plane's watch on Redis memory: how full Redis is against its ``maxmemory`` bound.

Every ``snapshot_refresh_s`` the control plane reads ``INFO memory`` and exports
``bastion_redis_memory_used_bytes``, ``bastion_redis_memory_max_bytes`` and
``bastion_redis_memory_high`` (1 at or past ``redis_memory_alert`` x ``maxmemory``). It logs
``redis_memory_high`` (warning) once when the share crosses the alert line and
``redis_memory_ok`` once when it is back under; a Redis without a bound (``maxmemory 0``, as a
managed Redis may be) is logged once as ``redis_maxmemory_unset``.

Queue data must never be evicted, so Bastion's Redis runs ``maxmemory-policy noeviction``: a full
Redis refuses writes (new jobs fail with 503) rather than dropping accepted ones. The state is
reported in the control plane's ``/readyz`` checks (``redis_memory``) without making it unready:
a full Redis is a capacity alarm for operators, and the admin API is what they need to act on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
from fastapi.concurrency import run_in_threadpool

from bastion import logs, metrics

log = logs.get("bastion.control.memory")


class MemoryWatch:
    """Reads Redis's memory figures, exports them, and logs each crossing of the alert line."""

    def __init__(self, client: Any, alert_share: float) -> None:
        self.client = client
        self.alert_share = alert_share
        self.state = "unknown"  # ok | high | unbounded | unknown (not read yet, or Redis away)
        self.used = 0
        self.bound = 0

    def check(self) -> str:
        """Read ``INFO memory`` once; the state after it."""
        try:
            info = self.client.info("memory")
        except redis.RedisError:
            return self.state  # Redis away: readiness says so; keep the last figures
        self.used, self.bound = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        metrics.REDIS_MEMORY_USED.set(self.used)
        metrics.REDIS_MEMORY_MAX.set(self.bound)
        if self.bound <= 0:
            if self.state != "unbounded":
                log.warning(
                    "redis_maxmemory_unset",
                    used_bytes=self.used,
                    hint="set maxmemory and maxmemory-policy noeviction on this Redis",
                )
            self._enter("unbounded")
            return self.state
        share = self.used / self.bound
        figures = {"used_bytes": self.used, "max_bytes": self.bound, "share": round(share, 3)}
        if share >= self.alert_share:
            if self.state != "high":
                log.warning("redis_memory_high", alert_share=self.alert_share, **figures)
            self._enter("high")
        else:
            if self.state == "high":
                log.info("redis_memory_ok", alert_share=self.alert_share, **figures)
            self._enter("ok")
        return self.state

    def _enter(self, state: str) -> None:
        self.state = state
        metrics.REDIS_MEMORY_HIGH.set(1 if state == "high" else 0)

    def report(self) -> dict[str, Any]:
        """The ``/readyz`` check: the state and, when Redis has a bound, the share used."""
        found: dict[str, Any] = {"state": self.state}
        if self.bound > 0:
            found["used_share"] = round(self.used / self.bound, 3)
        return found


async def watch(watcher: MemoryWatch, every_s: float) -> None:
    """``watcher.check`` now and every ``every_s`` seconds, off the event loop, until cancelled."""
    while True:
        try:
            await run_in_threadpool(watcher.check)
        except Exception as exc:  # an answer we could not read: try again next period
            log.warning("redis_memory_check_failed", error_type=type(exc).__name__)
        await asyncio.sleep(every_s)
