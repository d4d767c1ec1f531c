"""The admin API's wiring: the control plane's services, one router per admin resource under
``/admin/v1`` (every route needs an admin principal), and the health endpoints.

Routes live in ``bastion.control.routers``; who may call them in ``bastion.control.principals``,
settled before any body is read by ``bastion.control.gate``; every state change goes through the
unit of work in ``bastion.control.changes``. Loops run beside the API: the snapshot
reconcile, the Redis memory watch (``bastion.control.memory``), the decision log's three
(``bastion.audit.service``: the audit stream consumer, checkpoint signing, payload retention) and
model monitoring's two (``bastion.monitoring.service``: the drift judgement and its gauges, and the
feedback desk answering labels sent through the gateways).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.routing import compile_path

from bastion import health, logs
from bastion.asgi import new_app
from bastion.control import memory
from bastion.control.bootstrap import ensure_admin_key
from bastion.control.gate import AdminGate
from bastion.control.plane import ControlPlane, plane_of
from bastion.control.principals import principal
from bastion.control.routers import (
    audit,
    changes,
    deadletters,
    deployments,
    keys,
    lifecycle,
    models,
    monitoring,
    snapshot,
    status,
    subjects,
    tenants,
)
from bastion.settings import Settings

log = logs.get("bastion.control")
PREFIX = "/admin/v1"
ROUTERS = (
    models,
    lifecycle,
    deployments,
    deadletters,
    tenants,
    keys,
    snapshot,
    changes,
    audit,
    subjects,
    monitoring,
    status,
)
UPLOADS = (models.register_version,)  # routes whose body is an artifact: max_upload_bytes, not the JSON limit


async def _ready(request: Request) -> tuple[bool, dict[str, Any]]:
    """Ready when Redis answers; a Redis near its memory bound is reported, not unready."""
    ok = await run_in_threadpool(plane_of(request).ready)
    return ok, {"redis": ok, "redis_memory": request.app.state.memory.report()}


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
        if settings.environment != "production" or settings.admin_key is None:  # production: its own key only
            await run_in_threadpool(ensure_admin_key, control.registry, settings.admin_key_file)
        await run_in_threadpool(control.publish)
        await run_in_threadpool(control.audit.start)
        app.state.memory = memory.MemoryWatch(control.redis, settings.redis_memory_alert)
        loops = [
            asyncio.create_task(_reconcile(control, settings.snapshot_refresh_s)),
            asyncio.create_task(memory.watch(app.state.memory, settings.snapshot_refresh_s)),
            asyncio.create_task(control.audit.consume()),
            asyncio.create_task(control.audit.checkpoints()),
            asyncio.create_task(control.audit.sweep()),
            asyncio.create_task(control.monitoring.judge()),
            asyncio.create_task(control.monitoring.feedback.serve()),
        ]
        log.info("control_started")
        yield
        for loop in loops:
            loop.cancel()
        for loop in loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        control.redis.close()

    app = new_app(
        "Bastion control plane", lifespan, docs_enabled=settings.docs_enabled, max_body_bytes=settings.max_upload_bytes
    )
    for resource in ROUTERS:
        app.include_router(resource.router, prefix=PREFIX, dependencies=[Depends(principal)])
    app.include_router(health.router(_ready))
    uploads = [
        (compile_path(PREFIX + route.path)[0], frozenset(route.methods or ()))
        for resource in ROUTERS
        for route in resource.router.routes
        if isinstance(route, APIRoute) and route.endpoint in UPLOADS
    ]
    # Innermost of the middleware (inside the app-wide body limit of max_upload_bytes, the request
    # id and the security headers): add_middleware would put it outermost.
    app.user_middleware.append(Middleware(AdminGate, max_json_bytes=settings.max_admin_body_bytes, uploads=uploads))
    return app
