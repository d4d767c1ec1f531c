"""One reader task per gateway process receives every reply and resolves the waiting futures.

The gateway owns its reply stream ``r:{gateway-id}``: it creates it at start, keeps a TTL on it
while it lives (so a crashed gateway's stream expires), and deletes it on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from bastion import ids, logs
from bastion.constants import GATEWAY_BEAT_S, GATEWAY_STALE_S, GATEWAYS_KEY, reply_key

log = logs.get("bastion.gateway.replies")

_STREAM_TTL_S = GATEWAY_STALE_S
_TRIM_EVERY = 512  # replies read between two trims of the reply stream


@dataclass(slots=True)
class Reply:
    status: str
    blob: bytes
    error: str


class ReplyRouter:
    def __init__(self, redis: Any, gateway_id: str) -> None:
        self.redis = redis
        self.gateway_id = gateway_id
        self.key = reply_key(gateway_id)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._last_id = "0-0"
        self._read_since_trim = 0
        self.healthy = False

    def new_id(self) -> str:
        """A unique, unpredictable id for a sync job: ``s`` and 16 random hex digits (64 bits from
        the OS's CSPRNG), so one id tells nothing of another. Nothing depends on their order.

        Sync ids only name a reply in flight; access to any job is checked by tenant anyway.
        """
        return "s" + ids.hex_id()

    async def start(self) -> None:
        self._last_id = (await self._claim_stream()).decode()
        self._tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._keep_alive())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.redis.delete(self.key)
        with contextlib.suppress(Exception):
            await self.redis.zrem(GATEWAYS_KEY, self.gateway_id)

    def expect(self, job_id: str) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[job_id] = future
        return future

    def forget(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)

    async def _claim_stream(self) -> bytes:
        entry_id: bytes = await self.redis.xadd(self.key, {"hello": "1"}, maxlen=10_000, approximate=True)
        await self.redis.expire(self.key, _STREAM_TTL_S)
        await self._beat()
        return entry_id

    async def _beat(self) -> None:
        """Say this gateway is alive in ``GATEWAYS_KEY`` (read by ``bastion status``); members
        silent past ``GATEWAY_STALE_S`` are dropped by whoever beats next, and the key itself
        expires when no gateway beats."""
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(GATEWAYS_KEY, {self.gateway_id: now})
        pipe.zremrangebyscore(GATEWAYS_KEY, "-inf", now - GATEWAY_STALE_S)
        pipe.expire(GATEWAYS_KEY, GATEWAY_STALE_S)
        await pipe.execute()

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(GATEWAY_BEAT_S)
            try:
                if not await self.redis.expire(self.key, _STREAM_TTL_S):
                    await self._claim_stream()  # Redis lost it (restart without persistence)
                else:
                    await self._beat()
            except Exception as exc:
                log.warning("reply_stream_keepalive_failed", error_type=type(exc).__name__)

    async def _read_loop(self) -> None:
        while True:
            try:
                response = await self.redis.xread({self.key: self._last_id}, count=1000, block=1000)
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.healthy = False
                log.warning("reply_read_failed", error_type=type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if response:
                self._read_since_trim += len(response[0][1])
                if self._read_since_trim >= _TRIM_EVERY:
                    # Drop replies already read, so the stream holds little more than what is in flight.
                    self._read_since_trim = 0
                    with contextlib.suppress(Exception):
                        await self.redis.xtrim(self.key, minid=response[0][1][-1][0], approximate=True)
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode()
                    job_id = fields.get(b"j")
                    if job_id is None:
                        continue
                    future = self._waiting.pop(job_id.decode(), None)
                    if future is not None and not future.done():
                        future.set_result(
                            Reply(fields[b"s"].decode(), fields.get(b"b", b""), fields.get(b"e", b"").decode())
                        )
