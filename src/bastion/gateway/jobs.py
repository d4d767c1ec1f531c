"""Job routes: a job's state and result, and a server-sent event stream until it ends.

A job is visible only to the tenant that created it; for anyone else it does not exist (404).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from bastion import codec
from bastion.constants import STATUS_SUCCEEDED, TERMINAL_STATUSES, job_key
from bastion.errors import NotFound
from bastion.gateway import payloads
from bastion.gateway.auth import JOBS, authenticate, declares
from bastion.gateway.pipeline import redis_errors
from bastion.gateway.state import GatewayState
from bastion.responses import json_response

router = APIRouter()

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_POLL_S = 0.1
_HEARTBEAT_S = 15.0
_MAX_STREAM_S = 3600.0


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
    status = fields.get("status", b"").decode()
    doc: dict[str, Any] = {"id": job_id, "model": fields.get("model", b"").decode(), "status": status}
    if fields.get("version"):
        doc["version"] = int(fields["version"])
    for name in ("created", "started", "finished"):
        if name in fields:
            doc[f"{name}_at"] = int(fields[name]) / 1000
    if status == STATUS_SUCCEEDED and fields.get("result"):
        doc["outputs"] = payloads.v1_outputs(codec.decode(fields["result"]))
    elif fields.get("error"):
        doc["error"] = fields["error"].decode()
    return doc


@router.get("/v1/jobs/{job_id}", tags=["jobs"], openapi_extra=declares(JOBS))
async def get_job(job_id: str, request: Request) -> Response:
    """The job's status, and its outputs once it has succeeded."""
    state: GatewayState = request.app.state.gateway
    key = await authenticate(request, state, *JOBS)
    return json_response(await _load(state, key.tenant, job_id))


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], openapi_extra=declares(JOBS))
async def job_events(job_id: str, request: Request) -> Response:
    """Server-sent events: a ``status`` event on each change, then ``result`` when the job ends."""
    state: GatewayState = request.app.state.gateway
    key = await authenticate(request, state, *JOBS)
    first = await _load(state, key.tenant, job_id)

    async def events() -> AsyncIterator[bytes]:
        doc = first
        last_status = ""
        started = last_sent = time.monotonic()
        while True:
            if doc["status"] != last_status:
                last_status = doc["status"]
                last_sent = time.monotonic()
                if last_status in TERMINAL_STATUSES:
                    yield b"event: result\ndata: " + orjson.dumps(doc) + b"\n\n"
                    return
                yield b"event: status\ndata: " + orjson.dumps({"id": job_id, "status": last_status}) + b"\n\n"
            now = time.monotonic()
            if now - started > _MAX_STREAM_S:
                yield b"event: timeout\ndata: {}\n\n"
                return
            if now - last_sent > _HEARTBEAT_S:
                last_sent = now
                yield b": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(_POLL_S)
            try:
                doc = await _load(state, key.tenant, job_id)
            except NotFound:
                yield b"event: gone\ndata: {}\n\n"
                return

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
