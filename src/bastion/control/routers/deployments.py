"""Deployments: routes and canaries, rollback, the kill switch, serving options, shadow figures."""

from __future__ import annotations

import functools
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import ControlPlane, plane_of
from bastion.control.principals import needs, principal
from bastion.control.schemas import DeploymentSet
from bastion.registry.serving import ServingOptions
from bastion.responses import json_response

router = APIRouter()


def _routing(view: dict[str, Any]) -> dict[str, Any]:
    return {k: view.get(k) for k in ("routes", "rules", "fallback_version", "disabled")}


async def route_primary(plane: ControlPlane, caller: dict[str, Any], model: str, version: int) -> bool:
    """Warm ``version`` up on the workers (outside any unit of work: it waits), then make it the
    primary; whether it was warm in time."""
    warm = await run_in_threadpool(plane.warm_up, model, [version])
    await changes.run(
        plane,
        caller,
        "deployment.promote",
        ("model", model),
        functools.partial(plane.registry.deployments.promote, model, version, str(caller["id"])),
        detail=_routing,
    )
    return warm


@router.get("/models/{name}/deployment", tags=["deployments"], **needs("models:read"))
async def get_deployment(name: str, request: Request) -> Response:
    """The model's routes, fallback version and kill-switch state; who changed it last and when
    (``updated_at``, ISO 8601 UTC)."""
    return json_response(await run_in_threadpool(plane_of(request).registry.deployments.get, name))


@router.put("/models/{name}/deployment", tags=["deployments"], **needs("deploy"))
async def set_deployment(
    name: str,
    body: DeploymentSet,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Route traffic: one primary and optional weighted canaries (sticky per subject), and a fallback."""
    plane = plane_of(request)
    routes = [r.model_dump() for r in body.routes]
    rules = [r.model_dump(exclude_none=True) for r in body.rules]
    deployments = plane.registry.deployments
    await run_in_threadpool(deployments.check, name, routes, body.fallback_version, rules)
    wanted = [r["version"] for r in routes] + ([body.fallback_version] if body.fallback_version else [])
    warm = await run_in_threadpool(plane.warm_up, name, wanted)
    deploy = functools.partial(deployments.deploy, name, routes, body.fallback_version, str(admin["id"]), rules=rules)
    view = await changes.run(plane, admin, "deployment.set", ("model", name), deploy, detail=_routing)
    return json_response({**view, "warm": warm})


@router.post("/models/{name}/rollback", tags=["deployments"], **needs("deploy"))
async def rollback(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """All traffic back to the production version (canaries dropped), or one version further back
    in the deployment history on each call (409 when there is none). The kill switch, fallback and
    rules stay as they are."""
    plane = plane_of(request)
    undo = functools.partial(plane.registry.deployments.rollback, name, str(admin["id"]))
    return json_response(await changes.run(plane, admin, "deployment.rollback", ("model", name), undo, detail=_routing))


@router.post("/models/{name}/disable", tags=["deployments"], **needs("deploy"))
async def disable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Kill switch: gateways answer 503 (or the fallback version) for this model at once."""
    plane = plane_of(request)
    off = functools.partial(plane.registry.deployments.set_disabled, name, True, str(admin["id"]))
    return json_response(await changes.run(plane, admin, "deployment.disable", ("model", name), off, detail=_routing))


@router.post("/models/{name}/enable", tags=["deployments"], **needs("deploy"))
async def enable(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    plane = plane_of(request)
    on = functools.partial(plane.registry.deployments.set_disabled, name, False, str(admin["id"]))
    return json_response(await changes.run(plane, admin, "deployment.enable", ("model", name), on, detail=_routing))


@router.get("/models/{name}/serving", tags=["deployments"], **needs("models:read"))
async def get_serving(name: str, request: Request) -> Response:
    """The model's default deadline, queue limits and response cache."""
    return json_response(await run_in_threadpool(plane_of(request).registry.serving.get, name))


@router.put("/models/{name}/serving", tags=["deployments"], **needs("deploy"))
async def set_serving(
    name: str,
    body: ServingOptions,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Set the model's default deadline, queue limits (503 + Retry-After beyond) and response cache TTL."""
    plane = plane_of(request)
    change = functools.partial(plane.registry.serving.set, name, body.model_dump(), str(admin["id"]))
    view = await changes.run(
        plane, admin, "serving.set", ("model", name), change, detail=lambda v: {"serving": v["serving"]}
    )
    return json_response(view)


@router.get("/models/{name}/shadow", tags=["deployments"], **needs("models:read"))
async def shadow_comparison(name: str, request: Request) -> Response:
    """Per shadow version: requests copied and compared, label agreement rate, mean absolute difference."""
    plane = plane_of(request)
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
    plane = plane_of(request)
    reset = functools.partial(plane.reset_shadow, name)
    await changes.run(plane, admin, "shadow.reset", ("model", name), reset, publish=False)
    return json_response({"model": name, "versions": {}})
