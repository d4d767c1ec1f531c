"""Keeps the gateway's in-memory copy of the control-plane snapshot fresh.

It reloads on a ``snap:notify`` message and, in case a notice is missed, every
``snapshot_refresh_s`` when the stored snapshot changed. A snapshot with a lower serial than the
one held is ignored: serials only grow, so a lower one is stale (e.g. a Redis restored from an
older copy), and using it could bring back a revoked key.
"""

from __future__ import annotations

from typing import Any

from bastion import logs
from bastion.constants import SNAPSHOT_CHANNEL, SNAPSHOT_KEY
from bastion.gateway.channel import ChannelWatcher
from bastion.snapshot import Snapshot

log = logs.get("bastion.gateway.snapshots")


class SnapshotWatcher:
    def __init__(self, redis: Any, refresh_s: float) -> None:
        self.redis = redis
        self.current = Snapshot.empty()
        self.loaded = False
        self._raw: bytes | None = None
        self._channel = ChannelWatcher(
            redis, SNAPSHOT_CHANNEL, on_connect=self.reload, on_tick=self._tick, idle_s=refresh_s
        )

    async def start(self) -> None:
        await self._channel.start()

    async def stop(self) -> None:
        await self._channel.stop()

    async def reload(self) -> None:
        raw = await self.redis.get(SNAPSHOT_KEY)
        if raw is None:
            return
        if raw == self._raw:
            return
        found = Snapshot.parse(raw)
        self._raw = raw
        if self.loaded and not found.newer_than(self.current):
            log.warning("snapshot_older_ignored", serial=found.serial, held=self.current.serial)
            return
        self.current = found
        self.loaded = True
        log.info("snapshot_loaded", serial=self.current.serial, models=len(self.current.models))

    async def _tick(self, _message: dict[str, Any] | None) -> None:
        await self.reload()  # on a notice, and every refresh_s in case a notice was missed
