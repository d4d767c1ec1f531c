"""The admin API's wiring: the control plane's services, one router per admin resource under
``/admin/v1`` (every route needs an admin principal), and the health endpoints.

Routes live in ``bastion.control.routers``; who may call them in ``bastion.control.principals``;
every state change goes through the unit of work in ``bastion.control.changes``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from bastion import health, logs
from bastion.asgi import new_app
from bastion.control.bootstrap import ensure_admin_key
from bastion.control.plane import ControlPlane, plane_of
from bastion.control.principals import principal
from bastion.control.routers import changes, deadletters, deployments, keys, lifecycle, models, snapshot, tenants
from bastion.settings import Settings

log = logs.get("bastion.control")
ROUTERS = (models, lifecycle, deployments, deadletters, tenants, keys, snapshot, changes)


async def _ready(request: Request) -> tuple[bool, dict[str, Any]]:
    ok = await run_in_threadpool(plane_of(request).ready)
    return ok, {"redis": ok}


async def _reconcile(control: ControlPlane, every_s: float) -> None:
    """Keep Redis's snapshot at least as new as SQL's last serial (``ControlPlane.reconcile``)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await run_in_threadpool(control.reconcile)
        except Exception as exc:  # Redis or SQL away: try again next period
            log.warning("snapshot_reconcile_failed", error_type=type(exc).__name__)


def create_app(settings: Settings, plane: ControlPlane | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        control: ControlPlane = plane if plane is not None else await run_in_threadpool(ControlPlane, settings)
        app.state.control = control
        await run_in_threadpool(ensure_admin_key, control.registry, settings.admin_key_file)
        await run_in_threadpool(control.publish)
        keeper = asyncio.create_task(_reconcile(control, settings.snapshot_refresh_s))
        log.info("control_started")
        yield
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        control.redis.close()

    app = new_app(
        "Bastion control plane", lifespan, docs_enabled=settings.docs_enabled, max_body_bytes=settings.max_upload_bytes
    )
    for resource in ROUTERS:
        app.include_router(resource.router, prefix="/admin/v1", dependencies=[Depends(principal)])
    app.include_router(health.router(_ready))
    return app
