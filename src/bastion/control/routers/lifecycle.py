"""The version lifecycle: gate policies, holdout sets, evaluation, approval, stages, history."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import ControlPlane, plane_of
from bastion.control.principals import needs, principal
from bastion.control.routers.deployments import route_primary
from bastion.control.schemas import StageSet
from bastion.jsonbody import parse_json
from bastion.registry.lifecycle import Policy
from bastion.responses import json_response

router = APIRouter()


async def live_figures(plane: ControlPlane, name: str) -> dict[int, dict[str, Any]] | None:
    """The model's live quality per version over ``accuracy_window_s``, when its live-accuracy
    gate needs them (None otherwise): from the feedback desk, never computed by the registry."""
    if not await run_in_threadpool(plane.registry.lifecycle.live_gated, name):
        return None
    window_s = plane.settings.accuracy_window_s
    figures: dict[int, dict[str, Any]] = await run_in_threadpool(plane.monitoring.feedback.quality, name, window_s)
    return figures


@router.get("/models/{name}/versions/{version}", tags=["lifecycle"], **needs("models:read"))
async def get_version(name: str, version: int, request: Request) -> Response:
    """One version: stage, metadata, verification, approval and its evaluation report; its times
    (``created_at``, ``approved_at``, the evaluation's ``requested_at``/``finished_at``) are ISO
    8601 UTC."""
    plane = plane_of(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    return json_response(await run_in_threadpool(plane.registry.get_version, name, version))


@router.get("/models/{name}/policy", tags=["lifecycle"], **needs("models:read"))
async def get_policy(name: str, request: Request) -> Response:
    return json_response(await run_in_threadpool(plane_of(request).registry.lifecycle.get_policy, name))


@router.put("/models/{name}/policy", tags=["lifecycle"], **needs("models:write"))
async def set_policy(
    name: str,
    body: Policy,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """The gates a version must pass to enter production (thresholds, documentation, approval,
    signature, and live accuracy against the primary's: ``live_accuracy_margin``, ``min_live_labels``)."""
    plane = plane_of(request)
    policy = body.model_dump(exclude_none=True)
    change = functools.partial(plane.registry.lifecycle.set_policy, name, policy, str(admin["id"]))
    view = await changes.run(plane, admin, "policy.set", ("model", name), change, detail={"policy": policy})
    return json_response(view)


@router.put("/models/{name}/holdout", tags=["lifecycle"], **needs("models:write"))
async def set_holdout(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Upload the labelled holdout set (JSON: ``inputs``, ``labels``, optional ``protected``)."""
    plane = plane_of(request)
    doc = parse_json(await request.body(), request.headers.get("content-type"))
    change = functools.partial(plane.registry.lifecycle.set_holdout, name, doc, str(admin["id"]))
    view = await changes.run(
        plane,
        admin,
        "holdout.set",
        ("model", name),
        change,
        detail=lambda v: {"sha256": v["holdout"]["sha256"], "rows": v["holdout"]["rows"]},
        publish=False,
    )
    return json_response(view)


@router.post("/models/{name}/versions/{version}/evaluate", status_code=202, tags=["lifecycle"], **needs("models:write"))
async def evaluate(
    name: str,
    version: int,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Evaluate the version on the model's holdout set, on a worker; poll the version for the report."""
    plane = plane_of(request)
    start = functools.partial(plane.start_evaluation, name, version, str(admin["id"]))
    job_id = await changes.run(
        plane,
        admin,
        "version.evaluate",
        ("version", f"{name}/{version}"),
        start,
        detail=lambda job: {"job_id": job},
        publish=False,
    )
    return json_response({"model": name, "version": version, "job_id": job_id, "status": "running"}, status_code=202)


@router.get("/models/{name}/versions/{version}/gates", tags=["lifecycle"], **needs("models:read"))
async def version_gates(name: str, version: int, request: Request) -> Response:
    """Every gate of the model's policy for this version, with whether it passes and why (the
    live-accuracy gate with the figures of both sides)."""
    plane = plane_of(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    live = await live_figures(plane, name)
    gates = await run_in_threadpool(plane.registry.lifecycle.gates, name, version, live)
    return json_response({"model": name, "version": version, "gates": gates})


@router.get("/models/{name}/versions/{version}/history", tags=["lifecycle"], **needs("models:read"))
async def version_history(name: str, version: int, request: Request) -> Response:
    """Who registered, evaluated, approved and moved the version, in order; each event's ``at``
    is ISO 8601 UTC."""
    events = await run_in_threadpool(plane_of(request).registry.lifecycle.history, name, version)
    return json_response({"model": name, "version": version, "events": events})


@router.post("/models/{name}/versions/{version}/approve", tags=["lifecycle"], **needs("deploy"))
async def approve(
    name: str,
    version: int,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Approve a version for production; the uploader cannot approve its own (four-eyes)."""
    plane = plane_of(request)
    change = functools.partial(plane.registry.lifecycle.approve, name, version, str(admin["id"]))
    view = await changes.run(plane, admin, "version.approve", ("version", f"{name}/{version}"), change, publish=False)
    return json_response(view)


@router.post("/models/{name}/versions/{version}/stage", tags=["lifecycle"], **needs("deploy"))
async def set_stage(
    name: str,
    version: int,
    body: StageSet,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Move a version to ``staging``, ``production`` (gates must pass, live accuracy included;
    it is warmed up on the workers, then becomes the primary) or ``retired``."""
    plane = plane_of(request)
    await run_in_threadpool(plane.collect_evaluation, name, version)
    live = await live_figures(plane, name) if body.stage == "production" else None
    change = functools.partial(
        plane.registry.lifecycle.set_stage, name, version, body.stage, str(admin["id"]), False, live
    )
    view = await changes.run(
        plane, admin, "version.stage", ("version", f"{name}/{version}"), change, detail={"stage": body.stage}
    )
    if body.stage == "production":
        view["warm"] = await route_primary(plane, admin, name, version)
    return json_response(view)
