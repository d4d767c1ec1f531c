"""Job routes: a job's state and result, and a server-sent event stream until it ends.

A job is visible only to the tenant that created it; for anyone else it does not exist (404).

An event stream holds a slot of its tenant's in-flight cap and of its key's stream cap
(``streams``) for as long as it is open, and gives both back however it ends: result, timeout,
revocation, client disconnect. It does not poll: it re-reads its job only when the gateway's
``JobWatch`` wakes it (a worker's notice, a resubscription, the periodic refresh), and it ends
with ``event: revoked`` - never a result - once its credential no longer authenticates against
the gateway's snapshot (revoked, expired, scope lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bastion import codec
from bastion.constants import STATUS_SUCCEEDED, TERMINAL_STATUSES, job_key
from bastion.errors import BastionError, NotFound
from bastion.gateway import payloads, streams
from bastion.gateway.auth import JOBS, authenticate, declares
from bastion.gateway.jobwatch import Watch
from bastion.gateway.pipeline import redis_errors
from bastion.gateway.state import GatewayState
from bastion.responses import json_response
from bastion.security import apikeys
from bastion.timefmt import iso_utc

router = APIRouter()

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_STREAM_S = 3600.0
_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def _load(state: GatewayState, tenant: str, job_id: str) -> dict[str, Any]:
    if not _JOB_ID.fullmatch(job_id):
        raise NotFound("no such job")
    async with redis_errors():
        raw = await state.redis.hgetall(job_key(job_id))
    fields = {k.decode(): v for k, v in raw.items()}
    if not fields or fields.get("tenant", b"").decode() != tenant:
        raise NotFound("no such job", job_id=job_id)
    return _document(job_id, fields)


def _document(job_id: str, fields: dict[str, bytes]) -> dict[str, Any]:
    """The job as its tenant sees it: id, model, the version it was routed to (the one the 202
    named), status, ``created_at``/``started_at``/``finished_at`` (ISO 8601 UTC; the hash keeps
    epoch milliseconds), then its outputs or error."""
    status = fields.get("status", b"").decode()
    doc: dict[str, Any] = {"id": job_id, "model": fields.get("model", b"").decode(), "status": status}
    if fields.get("version"):
        doc["version"] = int(fields["version"])
    for name in ("created", "started", "finished"):
        if fields.get(name):
            doc[f"{name}_at"] = iso_utc(int(fields[name]) / 1000)
    if status == STATUS_SUCCEEDED and fields.get("result"):
        doc["outputs"] = payloads.v1_outputs(codec.decode(fields["result"]))
    elif fields.get("error"):
        doc["error"] = fields["error"].decode()
    return doc


@router.get("/v1/jobs/{job_id}", tags=["jobs"], openapi_extra=declares(JOBS))
async def get_job(job_id: str, request: Request) -> Response:
    """The job's status, the model version it was routed to, its times (``created_at``,
    ``started_at``, ``finished_at``: ISO 8601 UTC, e.g. ``2026-12-02T06:27:56.123Z``) and its
    outputs once it has succeeded (or its error)."""
    state: GatewayState = request.app.state.gateway
    key = await authenticate(request, state, *JOBS)
    return json_response(await _load(state, key.tenant, job_id))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], openapi_extra=declares(JOBS))
async def job_events(job_id: str, request: Request) -> Response:
    """Server-sent events: a ``status`` event on each change, then ``result`` when the job ends,
    carrying the job as ``GET /v1/jobs/{id}`` shows it (or ``revoked`` when the credential stops
    authenticating, ``timeout``, ``gone``). Refused with 429 when the key's open streams or the
    tenant's in-flight cap are at their limit."""
    state: GatewayState = request.app.state.gateway
    key = await authenticate(request, state, *JOBS)
    token = apikeys.bearer(request.headers.get("authorization")) or ""
    watch = Watch(job_id, key, apikeys.digest(token), JOBS)
    state.jobwatch.add(watch)  # before the first read: a notice from here on wakes the stream
    try:
        first = await _load(state, key.tenant, job_id)
        if first["status"] not in TERMINAL_STATUSES:  # a finished job's stream answers at once: no slot
            async with redis_errors():
                watch.slot = await streams.take(
                    state.redis,
                    state.gateway_id,
                    tenant=key.tenant,
                    key_id=key.id,
                    job_id=job_id,
                    tenant_cap=key.limits.max_concurrency,
                    key_cap=state.settings.max_streams_per_key,
                )
    except BaseException:
        state.jobwatch.remove(watch)
        raise
    return EventStream(state, watch, first)


class EventStream(Response):
    """The SSE response of one job. It listens for the client's disconnect itself (whatever the
    server's ASGI version) and, on every way out, hands its watch and slots back."""

    media_type = "text/event-stream"

    def __init__(self, state: GatewayState, watch: Watch, first: dict[str, Any]) -> None:
        self.state = state
        self.watch = watch
        self.first = first
        self.status_code = 200
        self.background = None
        self.init_headers(_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        listener = asyncio.get_running_loop().create_task(self._listen(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self._events():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        finally:
            listener.cancel()
            self.state.jobwatch.remove(self.watch)

    async def _listen(self, receive: Receive) -> None:
        with contextlib.suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
            self.watch.disconnected = True
            self.watch.poke()

    def _last_event(self, doc: dict[str, Any] | None) -> bytes | None:
        """The event that ends the stream now (b"": end without one), or None to go on."""
        watch = self.watch
        if watch.disconnected:
            return b""
        if not watch.authorized(self.state.snapshots.current, time.time()):  # before anything is sent
            return b"event: revoked\ndata: {}\n\n"
        if doc is None:
            return b"event: gone\ndata: {}\n\n"
        if doc["status"] in TERMINAL_STATUSES:
            return b"event: result\ndata: " + orjson.dumps(doc) + b"\n\n"
        if watch.ended is not None:  # slots lapsed, or the gateway is going away: reconnect
            return b"event: timeout\ndata: {}\n\n"
        return None

    async def _events(self) -> AsyncIterator[bytes]:
        watch = self.watch
        doc: dict[str, Any] | None = self.first
        started = last_sent = time.monotonic()
        while True:
            last = self._last_event(doc)
            if last is not None:
                if last:
                    yield last
                return
            if doc is not None and doc["status"] != watch.status:  # (None: _last_event ended the stream)
                watch.status = doc["status"]
                last_sent = time.monotonic()
                yield b"event: status\ndata: " + orjson.dumps({"id": watch.job_id, "status": watch.status}) + b"\n\n"
            now = time.monotonic()
            if now - started >= _MAX_STREAM_S:
                yield b"event: timeout\ndata: {}\n\n"
                return
            if now - last_sent >= streams.HEARTBEAT_S:
                last_sent = now
                yield b": keep-alive\n\n"
            await watch.wait(min(last_sent + streams.HEARTBEAT_S, started + _MAX_STREAM_S) - time.monotonic())
            if watch.job_changed and not watch.disconnected:
                watch.job_changed = False
                doc = await self._reload(doc)

    async def _reload(self, doc: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            return await _load(self.state, self.watch.key.tenant, self.watch.job_id)
        except NotFound:
            return None
        except BastionError:  # Redis away: keep what we have; the periodic refresh wakes us again
            return doc
