"""The snapshot gateways and workers read: publish it again on demand."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import plane_of
from bastion.control.principals import needs, principal
from bastion.responses import json_response

router = APIRouter()


@router.post("/snapshot", tags=["snapshot"], **needs("deploy"))
async def publish_snapshot(
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Publish the snapshot again (gateways and workers reload it); the serial Redis holds now."""
    serial = await run_in_threadpool(functools.partial(changes.republish, plane_of(request), admin))
    return json_response({"serial": serial})
