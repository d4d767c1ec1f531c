"""API keys: create (shown once), list, rotate, revoke.

A caller may create, rotate or revoke only keys whose scopes it holds itself
(``principals.may_grant``): a key manager cannot mint an admin key, obtain the bootstrap admin
key's new secret by rotating it, or lock an administrator out by revoking its key.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.constants import SCOPES
from bastion.control import changes
from bastion.control.plane import plane_of
from bastion.control.principals import may_grant, needs, principal
from bastion.control.schemas import KeyCreate, KeyRotate
from bastion.errors import Forbidden
from bastion.responses import json_response
from bastion.timefmt import iso_utc, parse_iso, to_millisecond

router = APIRouter()


@router.post("/keys", status_code=201, tags=["keys"], **needs("keys"))
async def create_key(
    body: KeyCreate,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Create an API key. The key itself is in this response only; it is stored as a hash.
    Its scopes must be ones the caller holds (403 otherwise); ``subject_trusted`` lets the key
    name the subject of a request (``X-Bastion-Subject``), for trusted back ends. ``expires_at``
    is ISO 8601 (without a zone: UTC), kept to the millisecond and answered in UTC
    (``2030-01-01T00:00:00.000Z``)."""
    plane = plane_of(request)
    may_grant(admin, [s for s in body.scopes if s in SCOPES], f"creating a key for tenant {body.tenant!r}")
    bounded_by_caller(admin, body.expires_at)

    def create() -> dict[str, Any]:
        row, plaintext = plane.registry.create_key(
            body.tenant, body.name, body.scopes, body.expires_at, body.tier, body.subject_trusted
        )
        return {
            "id": row.id,
            "tenant": body.tenant,
            "scopes": row.scopes,
            "key": plaintext,
            "tier": row.tier,
            "subject_trusted": row.subject_trusted,
            "expires_at": iso_utc(row.expires_at),
        }

    view = await changes.run(
        plane,
        admin,
        "key.create",
        ("key", lambda v: v["id"]),
        create,
        detail=lambda v: {k: v[k] for k in ("tenant", "scopes", "tier", "subject_trusted", "expires_at")},
    )
    return json_response(view, status_code=201)


def bounded_by_caller(caller: dict[str, Any], expires_at: datetime | None) -> None:
    """A key a caller creates expires no later than the caller's own (403 otherwise): a key
    manager whose key expires tomorrow cannot mint itself a key that never does."""
    own = caller.get("expires_at")
    if not own:
        return
    limit = parse_iso(own)  # to the millisecond, as keys' expiry times are kept
    if expires_at is None or to_millisecond(expires_at) > limit:
        raise Forbidden(f"the new key must expire no later than the caller's own key ({iso_utc(limit)})")


@router.get("/keys", tags=["keys"], **needs("keys"))
async def list_keys(request: Request, tenant: str | None = Query(default=None, max_length=64)) -> Response:
    """Every key (never a secret), oldest first; ``created_at``, ``expires_at`` and ``revoked_at``
    are ISO 8601 UTC (``2026-12-02T06:27:56.123Z``), null when not set."""
    return json_response({"keys": await run_in_threadpool(plane_of(request).registry.list_keys, tenant)})


@router.delete("/keys/{key_id}", tags=["keys"], **needs("keys"))
async def revoke_key(
    key_id: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Revoke a key; gateways stop accepting it as soon as they see the new snapshot."""
    plane = plane_of(request)
    key_id = key_id[:64]

    def revoke() -> dict[str, Any]:
        may_grant(admin, plane.registry.get_key(key_id)["scopes"], f"revoking key {key_id!r}")
        return plane.registry.revoke_key(key_id)

    view = await changes.run(
        plane, admin, "key.revoke", ("key", key_id), revoke, detail=lambda v: {"tenant": v["tenant"]}
    )
    return json_response(view)


@router.post("/keys/{key_id}/rotate", status_code=201, tags=["keys"], **needs("keys"))
async def rotate_key(
    key_id: str,
    body: KeyRotate,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """A new secret for the key's tenant, scopes and tier; the old secret keeps working for
    ``overlap_s`` seconds. The new secret is in this response only."""
    plane = plane_of(request)
    key_id = key_id[:64]

    def rotate() -> dict[str, Any]:
        old = plane.registry.get_key(key_id)
        may_grant(admin, old["scopes"], f"rotating key {key_id!r}")
        expires = old.get("expires_at")
        bounded_by_caller(admin, parse_iso(expires) if expires else None)
        view, plaintext = plane.registry.rotate_key(key_id, body.overlap_s)
        return {**view, "secret": plaintext}

    view = await changes.run(
        plane,
        admin,
        "key.rotate",
        ("key", key_id),
        rotate,
        detail=lambda v: {"new_key_id": v["key"]["id"], "overlap_s": body.overlap_s},
    )
    return json_response(view, status_code=201)
