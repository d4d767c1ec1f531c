"""Keeps the gateway's in-memory copy of the control-plane snapshot fresh.

It reloads on a ``snap:notify`` message and, in case a notice is missed, every
``snapshot_refresh_s`` when the stored serial changed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bastion import logs
from bastion.constants import SNAPSHOT_CHANNEL, SNAPSHOT_KEY
from bastion.snapshot import Snapshot

log = logs.get("bastion.gateway.snapshots")


class SnapshotWatcher:
    def __init__(self, redis: Any, refresh_s: float) -> None:
        self.redis = redis
        self.refresh_s = refresh_s
        self.current = Snapshot.empty()
        self.loaded = False
        self._raw: bytes | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self.reload()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def reload(self) -> None:
        raw = await self.redis.get(SNAPSHOT_KEY)
        if raw is None:
            return
        if raw != self._raw:
            self.current = Snapshot.parse(raw)
            self._raw = raw
            self.loaded = True
            log.info("snapshot_loaded", serial=self.current.serial, models=len(self.current.models))

    async def _watch(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(SNAPSHOT_CHANNEL)
                await self.reload()
                while True:
                    await pubsub.get_message(timeout=self.refresh_s)
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("snapshot_watch_failed", error_type=type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
