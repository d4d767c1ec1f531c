"""The gateway's health and readiness (``bastion.health``), and the Open Inference Protocol's
server metadata and health routes; no credentials, no tenant data.

``/metrics`` is not served on the public port unless ``public_metrics`` is set (a 404 like any
unknown path); the gateway's metrics are on its private metrics port (``gateway_metrics_port``
on ``control_host``, started by ``bastion.gateway.server``).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from bastion import __version__, health
from bastion.gateway.state import GatewayState
from bastion.responses import json_response


async def ready(request: Request) -> tuple[bool, dict[str, Any]]:
    """Ready to take traffic: Redis reachable, snapshot loaded, reply reader running, not draining."""
    state: GatewayState = request.app.state.gateway
    checks = {"snapshot": state.snapshots.loaded, "replies": state.replies.healthy, "draining": state.draining}
    try:
        checks["redis"] = bool(await state.redis.ping())
    except Exception:
        checks["redis"] = False
    ok = checks["snapshot"] and checks["replies"] and checks["redis"] and not state.draining
    return ok, checks


def _public_metrics(request: Request) -> bool:
    state: GatewayState = request.app.state.gateway
    return state.settings.public_metrics


router = health.router(ready, metrics_served=_public_metrics)


@router.get("/v2", tags=["open inference protocol"])
async def server_metadata() -> Response:
    """Open Inference Protocol server metadata."""
    return json_response({"name": "bastion", "version": __version__, "extensions": ["binary_tensor_data"]})


@router.get("/v2/health/live", tags=["open inference protocol"])
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", tags=["open inference protocol"])
async def oip_ready(request: Request) -> Response:
    ok, _ = await ready(request)
    return json_response({"ready": ok}, status_code=200 if ok else 503)


__all__ = ["router"]
