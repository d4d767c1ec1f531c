"""Relaying a generation's chunks as they are produced: the per-job streams and the SSE response.

``ChunkRouter`` is one reader task per gateway for every generation it relays: a single
``XREAD BLOCK`` over all the ``s:{job id}`` streams followed now (one Redis connection, whatever
the number of streams), handing each entry to its stream's subscriber the moment it arrives. A new
subscription wakes the reader at once through the gateway's own wake stream (an ``XADD`` that the
blocked ``XREAD`` also reads), so no stream waits for a poll to be followed.

``relay`` yields one job's entries as they come (``StreamEvent``; ``None`` when nothing came for
the keep-alive period). It also watches the job's reply: a job that ended without writing its
last entry (it expired in the queue, the worker failed it) ends the relay with that outcome, and a
stream that stopped short of the answer is completed from the stored outcome. Past the caller's
deadline the job is abandoned (``DeadlineExceeded``, or the outcome a worker stored first).

``EventStream`` is the ASGI response: headers at once, then each chunk as its own body message
(nothing buffered), and a watch on the connection: when the client goes away it stops the relay
and calls ``on_close(True)`` (the caller then sets the job's cancel flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from bastion import codec, logs
from bastion.constants import GATEWAY_STALE_S, STATUS_SUCCEEDED
from bastion.errors import DeadlineExceeded, InvalidInput, JobFailed, Unavailable
from bastion.gateway import pipeline
from bastion.gateway.replies import Reply
from bastion.text.jobs import Completion, StreamEvent, read_entry, read_outputs, stream_key

log = logs.get("bastion.gateway.stream")

BLOCK_MS = 1000  # the reader's XREAD BLOCK (under the client's socket timeout)
# a relay's own first read waits this long at most: it holds a connection of the gateway's shared
# pool meanwhile, so it is kept short (a job still queued past it is followed by the shared reader)
FIRST_BLOCK_MS = 10
READ_COUNT = 512
_WAKE_MAXLEN = 64


class Subscription:
    """One followed stream: the entries read for it, and the event its relay waits on."""

    __slots__ = ("entries", "error", "event", "read_from")

    def __init__(self) -> None:
        self.entries: deque[tuple[Any, Any]] = deque()
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self.read_from: Any = "0-0"  # where the reader goes on reading this stream


class ChunkRouter:
    def __init__(self, redis: Any, gateway_id: str) -> None:
        self.redis = redis
        self.wake_key = stream_key(f"wake-{gateway_id}")  # job ids never hold a '-': no clash
        self._wake_raw = self.wake_key.encode()
        self._subs: dict[bytes, Subscription] = {}
        self._task: asyncio.Task[None] | None = None
        self._waking: set[asyncio.Task[None]] = set()  # wakes in flight (held: a task needs a reference)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._read_loop())

    async def stop(self) -> None:
        for task in list(self._waking):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.redis.delete(self.wake_key)

    async def subscribe(self, job_id: str) -> Subscription:
        """Follow ``s:{job_id}`` from its first entry; the reader is woken to include it now, in
        the background (the relay's own first read does not wait for it; should the wake fail,
        the reader's next read, within ``BLOCK_MS``, includes the stream all the same)."""
        found = Subscription()
        self._subs[stream_key(job_id).encode()] = found
        task = asyncio.get_running_loop().create_task(self._wake_quietly())
        self._waking.add(task)
        task.add_done_callback(self._waking.discard)
        return found

    async def _wake_quietly(self) -> None:
        try:
            await self._wake()
        except Exception as exc:
            log.warning("chunk_wake_failed", error_type=type(exc).__name__)

    def unsubscribe(self, job_id: str) -> None:
        self._subs.pop(stream_key(job_id).encode(), None)

    async def _wake(self) -> Any:
        """Add a wake entry (the blocked reader returns); its id."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=_WAKE_MAXLEN, approximate=True)
        pipe.expire(self.wake_key, GATEWAY_STALE_S)
        async with pipeline.redis_errors():
            found = await pipe.execute()
        return found[0]

    async def _read_loop(self) -> None:
        wake_from: Any = None  # always an id: an entry added while no read is blocked is read next time
        while True:
            if wake_from is None:
                try:
                    wake_from = await self._wake()
                except Exception as exc:
                    log.warning("chunk_wake_failed", error_type=type(exc).__name__)
                    await asyncio.sleep(0.5)
                    continue
            keys: dict[Any, Any] = {self._wake_raw: wake_from}
            for key, followed in self._subs.items():
                keys[key] = followed.read_from
            try:
                found = await self.redis.xread(keys, count=READ_COUNT, block=BLOCK_MS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("chunk_read_failed", error_type=type(exc).__name__)
                for failed in list(self._subs.values()):
                    failed.error = Unavailable("the answer's stream cannot be read now; retry shortly")
                    failed.event.set()
                await asyncio.sleep(0.5)
                continue
            for key, entries in found or []:
                if key == self._wake_raw:
                    wake_from = entries[-1][0]
                    continue
                sub = self._subs.get(key)
                if sub is None or not entries:
                    continue
                sub.read_from = entries[-1][0]
                sub.entries.extend(entries)
                sub.event.set()


async def relay(
    queued: pipeline.Queued, router: ChunkRouter, sub: Subscription, keepalive_s: float
) -> AsyncIterator[StreamEvent | None]:
    """The job's chunks as they come, its last entry last (see the module docstring); ``sub`` is
    the job's subscription (taken before it was queued), given up here at the end."""
    shown: list[str] = []
    seen: Any = "0-0"  # the last entry handed on
    queued.future.add_done_callback(lambda _f: sub.event.set())
    try:
        # the first chunks are read here, on a connection of the pool, as soon as the worker writes
        # them: the shared reader is woken for this stream meanwhile, one round trip later (what
        # both read is handed on once)
        sub.entries.extendleft(reversed(await _first(queued)))
        quiet_since = time.monotonic()
        while True:
            if sub.entries:
                while (item := _next_after(sub.entries, seen)) is not None:
                    entry_id, fields = item
                    seen = entry_id
                    event = _event(fields, shown, queued, entry_id)
                    yield event
                    if event.last:
                        return
                quiet_since = time.monotonic()
                continue
            if sub.error is not None:
                raise sub.error
            future = queued.future
            if future.done() and not future.cancelled():
                router.unsubscribe(queued.own_id)  # read the rest here, from the last entry handed on
                async for event in _rest(queued, seen, shown):
                    yield event
                return
            now = time.monotonic()
            left = queued.waited_until - now
            if left <= 0:
                router.unsubscribe(queued.own_id)
                async for event in from_reply(queued.call, await _late(queued), shown):
                    yield event
                return
            wait = keepalive_s - (now - quiet_since)
            if wait <= 0:
                yield None
                quiet_since = time.monotonic()
                continue
            sub.event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, left)):
                    await sub.event.wait()
    finally:
        router.unsubscribe(queued.own_id)


async def _first(queued: pipeline.Queued) -> list[tuple[Any, Any]]:
    """The job's first entries, waiting at most ``FIRST_BLOCK_MS`` for one; [] when none came (or
    Redis failed: the shared reader carries on and says so)."""
    try:
        found = await queued.state.redis.xread(
            {stream_key(queued.own_id): "0-0"}, count=READ_COUNT, block=FIRST_BLOCK_MS
        )
    except (RedisError, OSError):
        return []
    return list(found[0][1]) if found else []


def _next_after(entries: deque[tuple[Any, Any]], seen: Any) -> tuple[Any, Any] | None:
    """The next of ``entries`` that comes after entry ``seen`` (the ones before it are dropped:
    the relay's first read and the shared reader may both have read them), or None."""
    while entries:
        item = entries.popleft()
        if _order(item[0]) > _order(seen):
            return item
    return None


def _order(entry_id: Any) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a sortable pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _event(fields: Any, shown: list[str], queued: pipeline.Queued, entry_id: Any = b"") -> StreamEvent:
    event = read_entry(fields)
    if entry_id:
        event = replace(event, entry_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id))
    if event.error is not None:
        raise JobFailed(event.error, job_id=queued.call.job_id)
    if event.text:
        shown.append(event.text)
    return event


async def _rest(queued: pipeline.Queued, seen: Any, shown: list[str]) -> AsyncIterator[StreamEvent]:
    """The job replied: what its stream still holds after ``seen``, then (when that has no last
    entry) the rest of the answer from the stored outcome."""
    async with pipeline.redis_errors():
        found = await queued.state.redis.xread({stream_key(queued.own_id): seen}, count=100_000)
    for entry_id, fields in found[0][1] if found else ():
        event = _event(fields, shown, queued, entry_id)
        yield event
        if event.last:
            return
    async for event in from_reply(queued.call, queued.future.result(), shown):
        yield event


async def _late(queued: pipeline.Queued) -> Reply:
    """Past the caller's deadline: the outcome a worker stored first, else ``DeadlineExceeded``
    (the job abandoned)."""
    late = await queued.abandon()
    if late is None:
        raise DeadlineExceeded(
            f"no complete answer within {queued.wait_s:.3g} s; the generation was stopped", job_id=queued.call.job_id
        )
    return late


def completion_of(outputs: dict[str, Any], job_id: str) -> Completion:
    """A generation's outcome from its outputs; a malformed one is the model's failure (502)."""
    try:
        return read_outputs(outputs)
    except InvalidInput as exc:
        raise JobFailed(exc.detail, job_id=job_id) from None


async def from_reply(call: Any, reply: Reply, shown: list[str]) -> AsyncIterator[StreamEvent]:
    """The rest of an answer from the job's stored outcome (after the chunks already ``shown``),
    then its last entry; the job's error when it did not succeed."""
    if reply.status != STATUS_SUCCEEDED:
        pipeline.reply_outputs(call, reply)  # raises the job's own error
    completion = completion_of(codec.decode(reply.blob), call.job_id)
    sent = "".join(shown)
    rest = completion.text[len(sent) :] if completion.text.startswith(sent) else ""
    if rest:
        yield StreamEvent(text=rest, completion_tokens=completion.completion_tokens)
    yield StreamEvent(
        finish=completion.finish,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that sends each chunk of ``body`` as it is produced and
    stops when the client disconnects; ``on_close(disconnected)`` runs once, at the end."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], headers: dict[str, str], on_close: Callable[[bool], None]
    ) -> None:
        super().__init__(
            body,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},  # no proxy buffers it
            media_type="text/event-stream",
        )
        self.chunks = body
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(self._watch(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                disconnected = True  # the client went away: stop relaying at once
            elif not pump.cancelled() and (failure := pump.exception()) is not None:
                disconnected = isinstance(failure, OSError)  # the server said so when we wrote (ASGI 2.4)
                if not disconnected:
                    log.warning("event_stream_failed", error_type=type(failure).__name__)
        finally:
            for task in (pump, watch):
                task.cancel()
            for task in (pump, watch):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await self.chunks.aclose()
            self.on_close(disconnected)

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
