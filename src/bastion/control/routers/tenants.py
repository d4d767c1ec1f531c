"""Tenants: their jurisdiction, consent flags, budget, artifact-signing key and payload retention."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import plane_of
from bastion.control.principals import needs, principal, scopes_of
from bastion.control.schemas import TenantSet
from bastion.errors import Forbidden
from bastion.responses import json_response

router = APIRouter()


@router.get("/tenants", tags=["tenants"], **needs("keys"))
async def list_tenants(request: Request) -> Response:
    return json_response({"tenants": await run_in_threadpool(plane_of(request).registry.list_tenants)})


@router.put("/tenants/{name}", tags=["tenants"], **needs("keys"))
async def set_tenant(
    name: str,
    body: TenantSet,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Create or update a tenant: its jurisdiction is what policy rules match (clients cannot set it);
    its Ed25519 ``signing_key`` verifies the artifacts it signs; ``retain_payloads_s`` says how
    long the decision log keeps its inputs and outputs (encrypted per subject; 0: not kept). A new
    tenant gets its pseudonym secret at once.

    Fields left out keep their values. ``keys`` sets budgets; changing the jurisdiction or
    consent flags (they decide which versions the tenant's data may reach) also needs ``deploy``,
    changing the payload retention (whether personal data is kept) needs ``audit``, and the
    signing key (a trust anchor of verified artifacts) needs ``admin``."""
    plane = plane_of(request)
    limits = body.limits.model_dump(exclude_none=True) if body.limits is not None else None

    def change() -> dict[str, Any]:
        current = next((t for t in plane.registry.list_tenants() if t["name"] == name), None)
        was = (current or {}).get("jurisdiction"), sorted((current or {}).get("consents") or [])
        # an omitted jurisdiction keeps the tenant's (null clears it), like the other fields
        jurisdiction = body.jurisdiction if "jurisdiction" in body.model_fields_set else was[0]
        wanted = jurisdiction, sorted(set(body.consents)) if body.consents is not None else was[1]
        held = scopes_of(admin)
        if wanted != was and "deploy" not in held:
            raise Forbidden(
                f"changing tenant {name!r}'s jurisdiction or consent flags decides which versions its data may "
                "reach: it needs the 'deploy' scope as well"
            )
        if body.signing_key is not None and "admin" not in held:
            raise Forbidden("setting a tenant's artifact-signing key (a trust anchor) needs the 'admin' scope")
        retain = body.retain_payloads_s
        if retain is not None and retain != (current or {}).get("retain_payloads_s", 0) and "audit" not in held:
            raise Forbidden(
                f"changing tenant {name!r}'s payload retention decides whether its inputs and outputs are kept: it "
                "needs the 'audit' scope as well"
            )
        return plane.registry.set_tenant(name, jurisdiction, body.signing_key, body.consents, limits, retain)

    view = await changes.run(
        plane,
        admin,
        "tenant.set",
        ("tenant", name),
        change,
        detail=lambda v: (
            {k: v[k] for k in ("jurisdiction", "consents", "limits", "retain_payloads_s")}
            | {"signing_key_set": bool(v["signing_key"])}
        ),
    )
    # its own transaction, after the commit: a secret cached for a rolled-back unit would be lost
    await run_in_threadpool(plane.audit.ensure_tenant_secret, name)
    return json_response(view)
