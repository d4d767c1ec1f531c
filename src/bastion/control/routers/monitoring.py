"""A model's monitoring report: drift per routed version (features against the reference sample,
outputs against the window before), traffic and live quality, canary and primary side by side."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control.plane import plane_of, redis_errors
from bastion.control.principals import needs
from bastion.control.routers.status import window_seconds
from bastion.registry.names import check_name
from bastion.responses import json_response

router = APIRouter()


@router.get("/models/{name}/monitoring", tags=["models"], **needs("models:read"))
async def monitoring(
    name: str,
    request: Request,
    window: str = Query(default="1h", max_length=16, description="drift window: 1m to monitoring_retention_s"),
) -> Response:
    """Per routed version: PSI, Jensen-Shannon distance, the sample-size-calibrated threshold and
    drifted yes/no per feature and output; rows judged; traffic; live accuracy (feedback)."""
    plane = plane_of(request)
    check_name("model", name)
    window_s = window_seconds(window, plane.settings.monitoring_retention_s)

    def report() -> dict[str, object]:
        with redis_errors("monitoring figures are unavailable"):
            return plane.monitoring.report(name, window_s)

    return json_response(await run_in_threadpool(report))
