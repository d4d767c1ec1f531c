"""The admin trail: every state change made through the admin API, who made it, oldest first."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control.plane import plane_of
from bastion.control.principals import needs
from bastion.registry.trail import MAX_PAGE
from bastion.responses import json_response

router = APIRouter()


@router.get("/changes", tags=["audit"], **needs("audit"))
async def list_changes(
    request: Request,
    after: int = Query(default=0, ge=0, le=2**62, description="only changes with a higher id (the last id seen)"),
    limit: int = Query(default=100, ge=1, le=MAX_PAGE),
) -> Response:
    """Changes in id order: when (``at``, ISO 8601 UTC), which principal, the action, the resource
    and a detail (never a secret). Page with ``after`` = the last ``id`` received; ``next_after``
    is null on the last page."""
    found = await run_in_threadpool(plane_of(request).registry.trail.listing, after, limit)
    return json_response({"changes": found, "next_after": found[-1]["id"] if len(found) == limit else None})
