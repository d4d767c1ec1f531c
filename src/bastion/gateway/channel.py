"""Follow a Redis pub/sub channel for as long as the gateway lives, reconnecting after errors.

``on_connect`` runs at start and after every (re)subscription, so nothing published while the
connection was down is missed for good; ``on_tick`` runs for every message, and with ``None``
each time ``idle_s`` passes without one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from bastion import logs

log = logs.get("bastion.gateway")


class ChannelWatcher:
    def __init__(
        self,
        redis: Any,
        channel: str,
        *,
        on_connect: Callable[[], Awaitable[None]],
        on_tick: Callable[[dict[str, Any] | None], Awaitable[None]],
        idle_s: float,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.on_connect = on_connect
        self.on_tick = on_tick
        self.idle_s = idle_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        with contextlib.suppress(Exception):
            await self.on_connect()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _watch(self) -> None:
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                await self.on_connect()
                while True:
                    await self.on_tick(await pubsub.get_message(timeout=self.idle_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("channel_watch_failed", channel=self.channel, error_type=type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
