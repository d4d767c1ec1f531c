"""The admin API: models, versions, keys and snapshot publishing. Every route needs an admin key."""

from __future__ import annotations

import functools
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from bastion import logs, snapshot
from bastion.artifacts.store import ArtifactStore
from bastion.asgi import new_app
from bastion.constants import shadow_key
from bastion.control.bootstrap import ensure_admin_key
from bastion.control.schemas import DeploymentSet, KeyCreate, TenantSet
from bastion.errors import Forbidden, Unauthenticated, Unavailable, UnsupportedMedia
from bastion.redisconn import sync_client
from bastion.registry import db
from bastion.registry.service import Registry
from bastion.responses import json_response
from bastion.security import apikeys
from bastion.settings import Settings

log = logs.get("bastion.control")


class ControlPlane:
    """The control plane's services, wired once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        engine = db.engine_for(settings.resolved_database_url)
        db.migrate(engine)
        self.registry = Registry(
            db.session_factory(engine), ArtifactStore(settings.resolved_artifact_dir), settings.max_upload_bytes
        )
        self.redis = sync_client(settings.require_redis_url(), socket_connect_timeout=2, socket_timeout=5)

    def shadow_totals(self, model: str, versions: list[int]) -> dict[str, dict[str, float | int | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for version in versions:
            pipe.hgetall(shadow_key(model, version))
        try:
            found = pipe.execute()
        except redis.RedisError as exc:
            raise Unavailable("shadow figures are unavailable: Redis is unreachable") from exc
        out: dict[str, dict[str, float | int | None]] = {}
        for version, raw in zip(versions, found, strict=True):
            if not raw:
                continue
            t = {k.decode(): float(v) for k, v in raw.items()}
            rows, values = t.get("rows", 0.0), t.get("values", 0.0)
            out[str(version)] = {
                "requests": int(t.get("requests", 0)),
                "rows": int(rows),
                "agreement_rate": t.get("agree_rows", 0.0) / rows if rows else None,
                "mean_abs_diff": t.get("abs_diff_sum", 0.0) / values if values else None,
            }
        return out

    def publish(self) -> int:
        try:
            return snapshot.publish(self.redis, self.registry.snapshot())
        except redis.RedisError as exc:
            raise Unavailable("the snapshot could not be published: Redis is unreachable") from exc


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def require_admin(request: Request) -> dict[str, Any]:
    plane = _plane(request)
    token = apikeys.bearer(request.headers.get("authorization"))
    if token is None:
        raise Unauthenticated("an admin key is required: send 'Authorization: Bearer <key>'")
    configured = plane.settings.admin_key
    if configured is not None and hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        return {"id": "env-admin", "tenant": "operators", "scopes": ["admin"]}
    key = plane.registry.key_by_secret(token)
    if key is None:
        raise Unauthenticated("the admin key is unknown, revoked or expired")
    if "admin" not in key["scopes"]:
        raise Forbidden("this key lacks the 'admin' scope")
    return key


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_admin)])


@router.get("/models", tags=["models"])
async def list_models(request: Request) -> Response:
    """Every model with its versions and the version that serves now."""
    return json_response({"models": await run_in_threadpool(_plane(request).registry.list_models)})


@router.get("/models/{name}", tags=["models"])
async def get_model(name: str, request: Request) -> Response:
    return json_response(await run_in_threadpool(_plane(request).registry.get_model, name))


@router.post(
    "/models/{name}/versions",
    status_code=201,
    tags=["models"],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def register_version(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(require_admin),  # noqa: B008 - FastAPI dependency
    description: str = Query(default="", max_length=4000),
    activate: bool = Query(default=True),
    version: int | None = Query(default=None, ge=1, le=1_000_000, description="name the version (409 if it exists)"),
    rows_independent: bool = Query(
        default=True, description="false when an output depends on other rows (e.g. softmax across the batch)"
    ),
) -> Response:
    """Register a new, immutable version from an ONNX file (the raw bytes are the body)."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/octet-stream":
        raise UnsupportedMedia("send the ONNX file as 'Content-Type: application/octet-stream'")
    data = await request.body()
    plane = _plane(request)
    view = await run_in_threadpool(
        plane.registry.register_version,
        name,
        data,
        description=description,
        created_by=str(admin["id"]),
        activate=activate,
        rows_independent=rows_independent,
        version=version,
    )
    await run_in_threadpool(plane.publish)
    log.info("version_registered", model=name, version=view["version"], sha256=view["sha256"], by=admin["id"])
    return json_response(view, status_code=201)


@router.get("/models/{name}/deployment", tags=["deployments"])
async def get_deployment(name: str, request: Request) -> Response:
    """The model's routes, fallback version and kill-switch state."""
    return json_response(await run_in_threadpool(_plane(request).registry.deployments.get, name))


@router.put("/models/{name}/deployment", tags=["deployments"])
async def set_deployment(
    name: str,
    body: DeploymentSet,
    request: Request,
    admin: dict[str, Any] = Depends(require_admin),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Route traffic: one primary and optional weighted canaries (sticky per subject), and a fallback."""
    plane = _plane(request)
    routes = [r.model_dump() for r in body.routes]
    rules = [r.model_dump(exclude_none=True) for r in body.rules]
    view = await run_in_threadpool(
        functools.partial(
            plane.registry.deployments.deploy, name, routes, body.fallback_version, str(admin["id"]), rules=rules
        )
    )
    return await _published(plane, view, "deployment_set", name, admin)


@router.post("/models/{name}/rollback", tags=["deployments"])
async def rollback(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(require_admin),  # noqa: B008 - FastAPI dependency
) -> Response:
    """All traffic back to the production version (canaries dropped), or to the previous one."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.deployments.rollback, name, str(admin["id"]))
    return await _published(plane, view, "deployment_rolled_back", name, admin)


@router.post("/models/{name}/disable", tags=["deployments"])
async def disable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(require_admin),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Kill switch: gateways answer 503 (or the fallback version) for this model at once."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.deployments.set_disabled, name, True, str(admin["id"]))
    return await _published(plane, view, "model_disabled", name, admin)


@router.post("/models/{name}/enable", tags=["deployments"])
async def enable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(require_admin),  # noqa: B008 - FastAPI dependency
) -> Response:
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.deployments.set_disabled, name, False, str(admin["id"]))
    return await _published(plane, view, "model_enabled", name, admin)


async def _published(
    plane: ControlPlane, view: dict[str, Any], event: str, model: str, admin: dict[str, Any]
) -> Response:
    """Publish the new snapshot (gateways obey on the notice), log the change, answer with it."""
    await run_in_threadpool(plane.publish)
    log.info(event, model=model, by=admin["id"], routes=view["routes"], disabled=view["disabled"])
    return json_response(view)


@router.get("/models/{name}/shadow", tags=["deployments"])
async def shadow_comparison(name: str, request: Request) -> Response:
    """Per shadow version: requests copied and compared, label agreement rate, mean absolute difference."""
    plane = _plane(request)
    model = await run_in_threadpool(plane.registry.get_model, name)
    versions = [v["version"] for v in model["versions"]]
    return json_response({"model": name, "versions": await run_in_threadpool(plane.shadow_totals, name, versions)})


@router.get("/tenants", tags=["tenants"])
async def list_tenants(request: Request) -> Response:
    return json_response({"tenants": await run_in_threadpool(_plane(request).registry.list_tenants)})


@router.put("/tenants/{name}", tags=["tenants"])
async def set_tenant(name: str, body: TenantSet, request: Request) -> Response:
    """Create or update a tenant; its jurisdiction is what policy rules match (clients cannot set it)."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.set_tenant, name, body.jurisdiction)
    await run_in_threadpool(plane.publish)
    log.info("tenant_set", tenant=name, jurisdiction=body.jurisdiction)
    return json_response(view)


@router.post("/keys", status_code=201, tags=["keys"])
async def create_key(body: KeyCreate, request: Request) -> Response:
    """Create an API key. The key itself is in this response only; it is stored as a hash."""
    plane = _plane(request)
    row, plaintext = await run_in_threadpool(
        plane.registry.create_key, body.tenant, body.name, body.scopes, body.expires_at
    )
    await run_in_threadpool(plane.publish)
    log.info("key_created", key_id=row.id, tenant=body.tenant)
    return json_response(
        {
            "id": row.id,
            "tenant": body.tenant,
            "scopes": row.scopes,
            "key": plaintext,
            "expires_at": body.expires_at.isoformat() if body.expires_at else None,
        },
        status_code=201,
    )


@router.get("/keys", tags=["keys"])
async def list_keys(request: Request, tenant: str | None = Query(default=None, max_length=64)) -> Response:
    return json_response({"keys": await run_in_threadpool(_plane(request).registry.list_keys, tenant)})


@router.delete("/keys/{key_id}", tags=["keys"])
async def revoke_key(key_id: str, request: Request) -> Response:
    """Revoke a key; gateways stop accepting it as soon as they see the new snapshot."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.revoke_key, key_id[:64])
    await run_in_threadpool(plane.publish)
    log.info("key_revoked", key_id=view["id"])
    return json_response(view)


@router.post("/snapshot", tags=["snapshot"])
async def publish_snapshot(request: Request) -> Response:
    """Publish the snapshot again (gateways and workers reload it)."""
    return json_response({"serial": await run_in_threadpool(_plane(request).publish)})


health = APIRouter()


@health.get("/healthz", tags=["health"])
async def healthz() -> Response:
    return json_response({"status": "ok"})


@health.get("/readyz", tags=["health"])
async def readyz(request: Request) -> Response:
    try:
        ok = bool(await run_in_threadpool(_plane(request).redis.ping))
    except redis.RedisError:
        ok = False
    return json_response({"ready": ok}, status_code=200 if ok else 503)


@health.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def create_app(settings: Settings, plane: ControlPlane | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        control: ControlPlane = plane if plane is not None else await run_in_threadpool(ControlPlane, settings)
        app.state.control = control
        await run_in_threadpool(ensure_admin_key, control.registry, settings.admin_key_file)
        await run_in_threadpool(control.publish)
        log.info("control_started")
        yield
        control.redis.close()

    app = new_app(
        "Bastion control plane", lifespan, docs_enabled=settings.docs_enabled, max_body_bytes=settings.max_upload_bytes
    )
    app.include_router(router)
    app.include_router(health)
    return app
