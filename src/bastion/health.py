"""Health, readiness and metrics endpoints for any Bastion HTTP process (no credentials; they
reveal no tenant data).

``router(ready)`` gives ``/healthz`` (the process is alive), ``/readyz`` (``ready(request)``
says whether it can take traffic, and the checks behind the answer: 200 or 503) and
``/metrics`` (Prometheus). With ``metrics_served`` given, ``/metrics`` answers only when it says
so for the request, and is otherwise the same 404 problem as a path that does not exist (the
gateway's public port: model names, versions and breaker states are for operators).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.responses import Response

from bastion.responses import json_response

Ready = Callable[[Request], Awaitable[tuple[bool, dict[str, Any]]]]


def router(ready: Ready, *, metrics_served: Callable[[Request], bool] | None = None) -> APIRouter:
    """The three endpoints, with readiness decided by ``ready`` and ``/metrics`` served always, or
    when ``metrics_served(request)``."""
    found = APIRouter()

    @found.get("/healthz", tags=["health"])
    async def healthz() -> Response:
        """The process is alive."""
        return json_response({"status": "ok"})

    @found.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> Response:
        """Ready to take traffic, with the checks that decided it."""
        ok, checks = await ready(request)
        return json_response({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @found.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        if metrics_served is not None and not metrics_served(request):
            raise HTTPException(404)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return found
