"""Keeps the gateway's in-memory copy of the control-plane snapshot fresh.

It fetches the snapshot at start, after every (re)subscription and on a ``snap:notify`` message.
Every ``snapshot_refresh_s`` without a notice (in case one was missed) it reads only the small
``snap:serial`` key and fetches the snapshot when that names a serial it has not seen (or is
missing, as on a Redis written before the key existed): an idle gateway reads a few bytes per
period, whatever the snapshot's size. A snapshot with a lower serial than the one held is
ignored: serials only grow, so a lower one is stale (e.g. a Redis restored from an older copy),
and using it could bring back a revoked key.
"""

from __future__ import annotations

from typing import Any

from bastion import logs
from bastion.constants import SNAPSHOT_CHANNEL, SNAPSHOT_KEY, SNAPSHOT_SERIAL_KEY
from bastion.gateway.channel import ChannelWatcher
from bastion.snapshot import Snapshot, changed

log = logs.get("bastion.gateway.snapshots")


class SnapshotWatcher:
    def __init__(self, redis: Any, refresh_s: float) -> None:
        self.redis = redis
        self.current = Snapshot.empty()
        self.loaded = False
        self._raw: bytes | None = None
        self._seen = 0  # the serial of the last snapshot fetched, held or ignored as older
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
        self._seen = found.serial
        if self.loaded and not found.newer_than(self.current):
            log.warning("snapshot_older_ignored", serial=found.serial, held=self.current.serial)
            return
        self.current = found
        self.loaded = True
        log.info("snapshot_loaded", serial=self.current.serial, models=len(self.current.models))

    async def _tick(self, message: dict[str, Any] | None) -> None:
        if message is not None:
            await self.reload()  # a notice: a new snapshot was written
            return
        polled = await self.redis.get(SNAPSHOT_SERIAL_KEY)  # no notice for refresh_s: did we miss one?
        if changed(polled, self._seen if self.loaded else 0):
            await self.reload()
