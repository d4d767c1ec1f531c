"""Health, readiness and metrics endpoints (no credentials; they reveal no tenant data)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from bastion import __version__
from bastion.gateway.state import GatewayState
from bastion.responses import json_response

router = APIRouter()


async def _ready(state: GatewayState) -> tuple[bool, dict[str, bool]]:
    checks = {"snapshot": state.snapshots.loaded, "replies": state.replies.healthy, "draining": state.draining}
    try:
        checks["redis"] = bool(await state.redis.ping())
    except Exception:
        checks["redis"] = False
    ok = checks["snapshot"] and checks["replies"] and checks["redis"] and not state.draining
    return ok, checks


@router.get("/healthz", tags=["health"])
async def healthz() -> Response:
    """The process is alive."""
    return json_response({"status": "ok"})


@router.get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    """Ready to take traffic: Redis reachable, snapshot loaded, reply reader running, not draining."""
    ok, checks = await _ready(request.app.state.gateway)
    return json_response({"ready": ok, "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"], include_in_schema=False)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v2", tags=["open inference protocol"])
async def server_metadata() -> Response:
    """Open Inference Protocol server metadata."""
    return json_response({"name": "bastion", "version": __version__, "extensions": []})


@router.get("/v2/health/live", tags=["open inference protocol"])
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", tags=["open inference protocol"])
async def ready(request: Request) -> Response:
    ok, _ = await _ready(request.app.state.gateway)
    return json_response({"ready": ok}, status_code=200 if ok else 503)
