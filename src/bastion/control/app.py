"""The admin API: models, versions, keys and snapshot publishing. Every route needs an admin key."""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from bastion import logs, snapshot
from bastion.artifacts.store import ArtifactStore
from bastion.asgi import new_app
from bastion.constants import OPERATORS_TENANT, TERMINAL_STATUSES, job_key, shadow_key, warm_key
from bastion.control.bootstrap import ensure_admin_key
from bastion.control.schemas import DeploymentSet, KeyCreate, KeyRotate, ReplayRequest, StageSet, TenantSet
from bastion.errors import Forbidden, InvalidInput, Overloaded, Unauthenticated, Unavailable, UnsupportedMedia
from bastion.queue import deadletters
from bastion.queue.producer import enqueue_evaluation
from bastion.redisconn import sync_client
from bastion.registry import db
from bastion.registry.limits import parse_tiers
from bastion.registry.metadata import GatePolicy
from bastion.registry.service import Registry
from bastion.registry.serving import ServingOptions
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
            db.session_factory(engine),
            ArtifactStore(settings.resolved_artifact_dir),
            settings.max_upload_bytes,
            tiers=parse_tiers(settings.rate_tiers),
            default_tier=settings.default_tier,
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

    def start_evaluation(self, model: str, version: int, by: str) -> str:
        """Queue an evaluation job for a worker; the report is collected when the version is read."""
        job_id, spec = self.registry.lifecycle.begin_evaluation(model, version, by)
        try:
            enqueue_evaluation(
                self.redis,
                job_id=job_id,
                model=model,
                version=version,
                spec=spec,
                max_queue=self.settings.max_queue_batch,
                ttl_s=self.settings.result_ttl_s,
            )
        except (redis.RedisError, Overloaded) as exc:
            self.registry.lifecycle.finish_evaluation(model, version, job_id, "failed", b"", "could not be queued")
            if isinstance(exc, Overloaded):
                raise
            raise Unavailable("the evaluation could not be queued: Redis is unreachable") from exc
        log.info("evaluation_requested", model=model, version=version, job_id=job_id, by=by)
        return job_id

    def collect_evaluation(self, model: str, version: int) -> None:
        """If the version's evaluation job has finished, store its report with the version."""
        job_id = self.registry.lifecycle.running_evaluation(model, version)
        if job_id is None:
            return
        try:
            state: Any = self.redis.hmget(job_key(job_id), "status", "result", "error")
        except redis.RedisError:
            return  # still running as far as anyone can tell; read again later
        status, result, error = (v or b"" for v in state)
        if status.decode() in TERMINAL_STATUSES:
            self.registry.lifecycle.finish_evaluation(model, version, job_id, status.decode(), result, error.decode())

    def publish(self, preload: dict[str, list[int]] | None = None) -> int:
        try:
            return snapshot.publish(self.redis, self.registry.snapshot(preload))
        except redis.RedisError as exc:
            raise Unavailable("the snapshot could not be published: Redis is unreachable") from exc

    def warm_up(self, model: str, versions: list[int]) -> bool:
        """Before ``versions`` take traffic, have the workers that serve ``model`` load and warm
        them up (phase one: a snapshot naming them as ``preload``; workers report in ``warm:``).
        Waits at most ``warm_timeout_s``; True when every new version is warm on some worker
        (or no worker serves the model yet, so there is nothing to wait for)."""
        dep = self.registry.deployments.get(model)
        routed = {r["version"] for r in dep["routes"]} | ({dep["fallback_version"]} - {None})
        new = sorted(set(versions) - routed)
        if not new or not any(self._warm_on_some_worker(model, v) for v in routed):
            return True
        self.publish(preload={model: new})
        deadline = time.monotonic() + self.settings.warm_timeout_s
        while not all(self._warm_on_some_worker(model, v) for v in new):
            if time.monotonic() > deadline:
                log.warning("warm_up_timed_out", model=model, versions=new, waited_s=self.settings.warm_timeout_s)
                return False
            time.sleep(0.02)
        return True

    def _warm_on_some_worker(self, model: str, version: int) -> bool:
        recent = time.time() - max(3 * self.settings.snapshot_refresh_s, 30.0)
        try:
            return bool(self.redis.zcount(warm_key(model, version), recent, "+inf"))
        except redis.RedisError as exc:
            raise Unavailable("Redis is unreachable") from exc

    def route_primary(self, model: str, version: int, by: str) -> bool:
        """Warm ``version`` up on the workers, then make it the primary and publish."""
        warm = self.warm_up(model, [version])
        self.registry.deployments.promote(model, version, by)
        self.publish()
        return warm


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.control
    return plane


def principal(request: Request) -> dict[str, Any]:
    """Who is calling: the ``BASTION_ADMIN_KEY`` (scope ``admin``) or a live key from the registry."""
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
    if key["tenant"] != OPERATORS_TENANT:
        raise Forbidden(f"only keys of the '{OPERATORS_TENANT}' tenant may use the admin API")
    return key


def needs(scope: str, **openapi: Any) -> dict[str, Any]:
    """Route arguments: the caller needs ``scope`` (or ``admin``); the OpenAPI document says so
    in ``x-bastion-scopes`` (the security tests read the route x scope matrix from there)."""

    def check(caller: dict[str, Any] = Depends(principal)) -> None:  # noqa: B008 - FastAPI dependency
        if "admin" not in caller["scopes"] and scope not in caller["scopes"]:
            raise Forbidden(f"this key lacks the '{scope}' scope (or 'admin') this route needs")

    return {"dependencies": [Depends(check)], "openapi_extra": {**openapi, "x-bastion-scopes": [scope, "admin"]}}


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(principal)])


@router.get("/models", tags=["models"], **needs("models:read"))
async def list_models(request: Request) -> Response:
    """Every model with its versions and the version that serves now."""
    return json_response({"models": await run_in_threadpool(_plane(request).registry.list_models)})


@router.get("/models/{name}", tags=["models"], **needs("models:read"))
async def get_model(name: str, request: Request) -> Response:
    return json_response(await run_in_threadpool(_plane(request).registry.get_model, name))


@router.post(
    "/models/{name}/versions",
    status_code=201,
    tags=["models"],
    **needs(
        "models:write",
        requestBody={
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["artifact"],
                        "properties": {
                            "artifact": {"type": "string", "format": "binary", "description": "the ONNX file"},
                            "metadata": {"type": "string", "description": "VersionMetadata as JSON"},
                            "signature": {"type": "string", "description": "base64 Ed25519 over the sha256"},
                        },
                    }
                },
            },
        },
    ),
)
async def register_version(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
    description: str = Query(default="", max_length=4000),
    activate: bool | None = Query(default=None, description="unset: activate unless the model has gates"),
    version: int | None = Query(default=None, ge=1, le=1_000_000, description="name the version (409 if it exists)"),
    rows_independent: bool | None = Query(
        default=None, description="false when an output depends on other rows (e.g. softmax across the batch)"
    ),
    signature: str | None = Query(default=None, max_length=200, description="base64 Ed25519 over the sha256"),
    signer: str | None = Query(default=None, max_length=64, description="tenant whose public key verifies it"),
) -> Response:
    """Register a new, immutable version: the ONNX file as the raw body, or a multipart form with
    the file (``artifact``), its metadata (``metadata``, JSON) and a detached ``signature``."""
    plane = _plane(request)
    data, metadata, form_signature = await _upload(request, plane.settings.max_upload_bytes)
    view = await run_in_threadpool(
        functools.partial(
            plane.registry.register_version,
            name,
            data,
            metadata=metadata,
            description=description,
            created_by=str(admin["id"]),
            activate=activate,
            rows_independent=rows_independent,
            version=version,
            artifact_signature=form_signature or signature,
            signer=signer,
            route=False,
        )
    )
    if view["stage"] == "production":
        view["warm"] = await run_in_threadpool(plane.route_primary, name, view["version"], str(admin["id"]))
    else:
        await run_in_threadpool(plane.publish)
    log.info(
        "version_registered",
        model=name,
        version=view["version"],
        sha256=view["sha256"],
        stage=view["stage"],
        verified=view["verified"],
        by=admin["id"],
    )
    return json_response(view, status_code=201)


async def _upload(request: Request, limit: int) -> tuple[bytes, dict[str, Any] | None, str | None]:
    """The artifact bytes, the metadata document and the signature of an upload."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        return await request.body(), None, None
    if content_type != "multipart/form-data":
        raise UnsupportedMedia(
            "send the ONNX file as 'Content-Type: application/octet-stream', or a multipart/form-data form "
            "with 'artifact', 'metadata' and 'signature'"
        )
    try:
        form = await request.form(max_files=1, max_fields=4, max_part_size=limit)
    except Exception as exc:  # python-multipart / Starlette raise several kinds for malformed forms
        raise InvalidInput("the multipart form is malformed or has too many parts") from exc
    unknown = sorted(set(form.keys()) - {"artifact", "metadata", "signature"})
    if unknown:
        raise InvalidInput(f"unknown form fields {unknown}; send 'artifact', 'metadata' and 'signature'")
    artifact = form.get("artifact")
    if artifact is None or isinstance(artifact, str):
        raise InvalidInput("the form needs the ONNX file as the 'artifact' file field")
    data = await artifact.read()
    raw_meta = form.get("metadata")
    metadata = None
    if raw_meta is not None:
        try:
            metadata = orjson.loads(raw_meta if isinstance(raw_meta, str) else await raw_meta.read())
        except orjson.JSONDecodeError as exc:
            raise InvalidInput("the 'metadata' field is not valid JSON") from exc
        if not isinstance(metadata, dict):
            raise InvalidInput("the 'metadata' field is a JSON object")
    sig = form.get("signature")
    return data, metadata, sig if isinstance(sig, str) else None


@router.get("/models/{name}/versions/{version}", tags=["lifecycle"], **needs("models:read"))
async def get_version(name: str, version: int, request: Request) -> Response:
    """One version: stage, metadata, verification, approval and its evaluation report."""
    plane = _plane(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    return json_response(await run_in_threadpool(plane.registry.get_version, name, version))


@router.get("/models/{name}/policy", tags=["lifecycle"], **needs("models:read"))
async def get_policy(name: str, request: Request) -> Response:
    return json_response(await run_in_threadpool(_plane(request).registry.lifecycle.get_policy, name))


@router.put("/models/{name}/policy", tags=["lifecycle"], **needs("models:write"))
async def set_policy(
    name: str,
    body: GatePolicy,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """The gates a version must pass to enter production (thresholds, documentation, approval, signature)."""
    lifecycle = _plane(request).registry.lifecycle
    view = await run_in_threadpool(lifecycle.set_policy, name, body.model_dump(exclude_none=True), str(admin["id"]))
    log.info("policy_set", model=name, by=admin["id"])
    return json_response(view)


@router.get("/models/{name}/serving", tags=["deployments"], **needs("models:read"))
async def get_serving(name: str, request: Request) -> Response:
    """The model's default deadline, queue limits and response cache."""
    return json_response(await run_in_threadpool(_plane(request).registry.serving.get, name))


@router.put("/models/{name}/serving", tags=["deployments"], **needs("deploy"))
async def set_serving(
    name: str,
    body: ServingOptions,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Set the model's default deadline, queue limits (503 + Retry-After beyond) and response cache TTL."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.serving.set, name, body.model_dump(), str(admin["id"]))
    await run_in_threadpool(plane.publish)
    log.info("serving_set", model=name, by=admin["id"], serving=view["serving"])
    return json_response(view)


@router.put("/models/{name}/holdout", tags=["lifecycle"], **needs("models:write"))
async def set_holdout(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Upload the labelled holdout set (JSON: ``inputs``, ``labels``, optional ``protected``)."""
    doc = await _json_body(request)
    view = await run_in_threadpool(_plane(request).registry.lifecycle.set_holdout, name, doc, str(admin["id"]))
    log.info("holdout_set", model=name, sha256=view["holdout"]["sha256"], rows=view["holdout"]["rows"])
    return json_response(view)


@router.post("/models/{name}/versions/{version}/evaluate", status_code=202, tags=["lifecycle"], **needs("models:write"))
async def evaluate(
    name: str,
    version: int,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Evaluate the version on the model's holdout set, on a worker; poll the version for the report."""
    plane = _plane(request)
    job_id = await run_in_threadpool(plane.start_evaluation, name, version, str(admin["id"]))
    return json_response({"model": name, "version": version, "job_id": job_id, "status": "running"}, status_code=202)


@router.get("/models/{name}/versions/{version}/gates", tags=["lifecycle"], **needs("models:read"))
async def version_gates(name: str, version: int, request: Request) -> Response:
    """Every gate of the model's policy for this version, with whether it passes and why."""
    plane = _plane(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    gates = await run_in_threadpool(plane.registry.lifecycle.gates, name, version)
    return json_response({"model": name, "version": version, "gates": gates})


@router.get("/models/{name}/versions/{version}/history", tags=["lifecycle"], **needs("models:read"))
async def version_history(name: str, version: int, request: Request) -> Response:
    """Who registered, evaluated, approved and moved the version, in order."""
    events = await run_in_threadpool(_plane(request).registry.lifecycle.history, name, version)
    return json_response({"model": name, "version": version, "events": events})


@router.post("/models/{name}/versions/{version}/approve", tags=["lifecycle"], **needs("deploy"))
async def approve(
    name: str,
    version: int,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Approve a version for production; the uploader cannot approve its own (four-eyes)."""
    view = await run_in_threadpool(_plane(request).registry.lifecycle.approve, name, version, str(admin["id"]))
    log.info("version_approved", model=name, version=version, by=admin["id"])
    return json_response(view)


@router.post("/models/{name}/versions/{version}/stage", tags=["lifecycle"], **needs("deploy"))
async def set_stage(
    name: str,
    version: int,
    body: StageSet,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Move a version to ``staging``, ``production`` (gates must pass; it becomes the primary) or ``retired``."""
    plane = _plane(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    lifecycle = plane.registry.lifecycle
    view = await run_in_threadpool(lifecycle.set_stage, name, version, body.stage, str(admin["id"]), False)
    if body.stage == "production":
        view["warm"] = await run_in_threadpool(plane.route_primary, name, version, str(admin["id"]))
    else:
        await run_in_threadpool(plane.publish)
    log.info("version_stage", model=name, version=version, stage=body.stage, by=admin["id"])
    return json_response(view)


async def _json_body(request: Request) -> Any:
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMedia("send JSON with 'Content-Type: application/json'")
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise InvalidInput("the body is not valid JSON") from exc


@router.get("/models/{name}/deployment", tags=["deployments"], **needs("models:read"))
async def get_deployment(name: str, request: Request) -> Response:
    """The model's routes, fallback version and kill-switch state."""
    return json_response(await run_in_threadpool(_plane(request).registry.deployments.get, name))


@router.put("/models/{name}/deployment", tags=["deployments"], **needs("deploy"))
async def set_deployment(
    name: str,
    body: DeploymentSet,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Route traffic: one primary and optional weighted canaries (sticky per subject), and a fallback."""
    plane = _plane(request)
    routes = [r.model_dump() for r in body.routes]
    rules = [r.model_dump(exclude_none=True) for r in body.rules]
    deployments = plane.registry.deployments
    await run_in_threadpool(deployments.check, name, routes, body.fallback_version, rules)
    wanted = [r["version"] for r in routes] + ([body.fallback_version] if body.fallback_version else [])
    warm = await run_in_threadpool(plane.warm_up, name, wanted)
    view = await run_in_threadpool(
        functools.partial(
            plane.registry.deployments.deploy, name, routes, body.fallback_version, str(admin["id"]), rules=rules
        )
    )
    return await _published(plane, {**view, "warm": warm}, "deployment_set", name, admin)


@router.post("/models/{name}/rollback", tags=["deployments"], **needs("deploy"))
async def rollback(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """All traffic back to the production version (canaries dropped), or to the previous one."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.deployments.rollback, name, str(admin["id"]))
    return await _published(plane, view, "deployment_rolled_back", name, admin)


@router.post("/models/{name}/disable", tags=["deployments"], **needs("deploy"))
async def disable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Kill switch: gateways answer 503 (or the fallback version) for this model at once."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.deployments.set_disabled, name, True, str(admin["id"]))
    return await _published(plane, view, "model_disabled", name, admin)


@router.post("/models/{name}/enable", tags=["deployments"], **needs("deploy"))
async def enable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
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


@router.get("/models/{name}/shadow", tags=["deployments"], **needs("models:read"))
async def shadow_comparison(name: str, request: Request) -> Response:
    """Per shadow version: requests copied and compared, label agreement rate, mean absolute difference."""
    plane = _plane(request)
    model = await run_in_threadpool(plane.registry.get_model, name)
    versions = [v["version"] for v in model["versions"]]
    return json_response({"model": name, "versions": await run_in_threadpool(plane.shadow_totals, name, versions)})


@router.delete("/models/{name}/shadow", tags=["deployments"], **needs("deploy"))
async def reset_shadow_comparison(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Start the shadow comparison figures afresh (e.g. when a new shadow period begins)."""
    plane = _plane(request)
    model = await run_in_threadpool(plane.registry.get_model, name)
    keys = [shadow_key(name, v["version"]) for v in model["versions"]]
    try:
        if keys:
            await run_in_threadpool(plane.redis.delete, *keys)
    except redis.RedisError as exc:
        raise Unavailable("shadow figures are unavailable: Redis is unreachable") from exc
    log.info("shadow_reset", model=name, by=admin["id"])
    return json_response({"model": name, "versions": {}})


@router.get("/models/{name}/dead-letters", tags=["jobs"], **needs("deploy"))
async def dead_letters(name: str, request: Request, count: int = Query(default=100, ge=1, le=10_000)) -> Response:
    """The newest dead-lettered jobs of the model (ids, tenant, reason; never their inputs)."""
    plane = _plane(request)
    await run_in_threadpool(plane.registry.get_model, name)
    try:
        found = await run_in_threadpool(deadletters.listing, plane.redis, name, count)
    except redis.RedisError as exc:
        raise Unavailable("dead letters are unavailable: Redis is unreachable") from exc
    return json_response({"model": name, "dead_letters": found})


@router.post("/models/{name}/dead-letters/replay", tags=["jobs"], **needs("deploy"))
async def replay_dead_letters(
    name: str,
    body: ReplayRequest,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Queue dead-lettered async jobs again (all of the newest 1,000 when no ids are given)."""
    plane = _plane(request)
    await run_in_threadpool(plane.registry.get_model, name)
    try:
        ids = body.ids or [d["id"] for d in await run_in_threadpool(deadletters.listing, plane.redis, name, 1000)]
        counts = await run_in_threadpool(deadletters.replay, plane.redis, name, ids, plane.settings.result_ttl_s)
    except redis.RedisError as exc:
        raise Unavailable("dead letters are unavailable: Redis is unreachable") from exc
    log.info("dead_letters_replayed", model=name, by=admin["id"], **counts)
    return json_response({"model": name, **counts})


@router.get("/tenants", tags=["tenants"], **needs("keys"))
async def list_tenants(request: Request) -> Response:
    return json_response({"tenants": await run_in_threadpool(_plane(request).registry.list_tenants)})


@router.put("/tenants/{name}", tags=["tenants"], **needs("keys"))
async def set_tenant(name: str, body: TenantSet, request: Request) -> Response:
    """Create or update a tenant: its jurisdiction is what policy rules match (clients cannot set it);
    its Ed25519 ``signing_key`` verifies the artifacts it signs."""
    plane = _plane(request)
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None
    view = await run_in_threadpool(
        plane.registry.set_tenant, name, body.jurisdiction, body.signing_key, body.consents, limits
    )
    await run_in_threadpool(plane.publish)
    log.info("tenant_set", tenant=name, jurisdiction=body.jurisdiction)
    return json_response(view)


@router.post("/keys", status_code=201, tags=["keys"], **needs("keys"))
async def create_key(body: KeyCreate, request: Request) -> Response:
    """Create an API key. The key itself is in this response only; it is stored as a hash."""
    plane = _plane(request)
    row, plaintext = await run_in_threadpool(
        plane.registry.create_key, body.tenant, body.name, body.scopes, body.expires_at, body.tier
    )
    await run_in_threadpool(plane.publish)
    log.info("key_created", key_id=row.id, tenant=body.tenant)
    return json_response(
        {
            "id": row.id,
            "tenant": body.tenant,
            "scopes": row.scopes,
            "key": plaintext,
            "tier": row.tier,
            "expires_at": body.expires_at.isoformat() if body.expires_at else None,
        },
        status_code=201,
    )


@router.get("/keys", tags=["keys"], **needs("keys"))
async def list_keys(request: Request, tenant: str | None = Query(default=None, max_length=64)) -> Response:
    return json_response({"keys": await run_in_threadpool(_plane(request).registry.list_keys, tenant)})


@router.delete("/keys/{key_id}", tags=["keys"], **needs("keys"))
async def revoke_key(key_id: str, request: Request) -> Response:
    """Revoke a key; gateways stop accepting it as soon as they see the new snapshot."""
    plane = _plane(request)
    view = await run_in_threadpool(plane.registry.revoke_key, key_id[:64])
    await run_in_threadpool(plane.publish)
    log.info("key_revoked", key_id=view["id"])
    return json_response(view)


@router.post("/keys/{key_id}/rotate", status_code=201, tags=["keys"], **needs("keys"))
async def rotate_key(key_id: str, body: KeyRotate, request: Request) -> Response:
    """A new secret for the key's tenant, scopes and tier; the old secret keeps working for
    ``overlap_s`` seconds. The new secret is in this response only."""
    plane = _plane(request)
    view, plaintext = await run_in_threadpool(plane.registry.rotate_key, key_id[:64], body.overlap_s)
    await run_in_threadpool(plane.publish)
    log.info("key_rotated", key_id=view["key"]["id"], rotated=view["rotated"]["id"], overlap_s=body.overlap_s)
    return json_response({**view, "secret": plaintext}, status_code=201)


@router.post("/snapshot", tags=["snapshot"], **needs("deploy"))
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
