"""The decision log, read by operators (scope ``audit``): events, search, proofs, checkpoints, verification.

Every route only reads. Positions are 0-based; a tree's *size* counts its leaves. Pages are
keyset pages (at most 1,000 items): pass a page's ``next_after`` (or ``next_start``) to get the
next; it is null on the last. A subject is searched for by its pseudonym within its tenant, never
stored or logged in clear: a subject of another tenant, or of a tenant the log knows nothing
about, finds nothing, exactly as a subject that never had a decision.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.audit.service import AuditService
from bastion.audit.signing import public_pem
from bastion.control.plane import plane_of
from bastion.control.principals import needs
from bastion.control.schemas import MAX_POSITION, AuditSearch, AuditVerify
from bastion.errors import InvalidInput, NotFound
from bastion.responses import json_response

router = APIRouter()
MAX_PAGE = 1000
_ID_HELP = "the event id: the prediction or job id of a decision, admin-<n> of an admin change"


def _audit(request: Request) -> AuditService:
    return plane_of(request).audit


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    """An event as the API shows it (as in a subject export): position, event (the logged document), leaf hash."""
    return {"position": item["position"], "event": item["leaf"], "leaf_hash": item["leaf_hash"]}


def _missing(event_id: str) -> NotFound:
    return NotFound(f"no event {event_id[:64]!r} in the decision log")


def _event(audit: AuditService, event_id: str, tenant: str | None) -> dict[str, Any]:
    """The event, or NotFound; with ``tenant``, another tenant's event reads exactly as a missing one."""
    found = audit.log.get(event_id)
    if tenant is not None and found["leaf"].get("tenant") != tenant:
        raise _missing(event_id)
    return found


@router.get("/audit/events/{event_id}", tags=["audit"], **needs("audit"))
async def show_event(
    request: Request,
    event_id: str = Path(max_length=64, description=_ID_HELP),
    tenant: str | None = Query(default=None, max_length=64, description="only an event of this tenant"),
) -> Response:
    """One event: its position, the logged document (``event``), its leaf hash and, for a decision, its
    payload: ``state`` ``kept`` with the ``inputs`` and ``outputs`` decrypted, or ``none`` (the
    tenant kept none), ``erased`` (its subject was erased), ``expired`` (past the tenant's
    retention) or ``unreadable``."""
    audit = _audit(request)

    def show() -> dict[str, Any]:
        found = _event(audit, event_id, tenant)
        payload = audit.log.payload(event_id) if found["leaf"].get("kind") == "decision" else {"state": "none"}
        return {**_shown(found), "payload": payload}

    return json_response(await run_in_threadpool(show))


@router.post("/audit/search", tags=["audit"], **needs("audit"))
async def search_events(body: AuditSearch, request: Request) -> Response:
    """Events (position, ``event``, leaf hash) matching every filter given, in position order, a
    page at a time (``after``: the ``next_after`` of the previous page). ``subject`` and ``model``
    need ``tenant``; ``version`` needs ``model``; ``since``/``until`` are ISO 8601 (``until``
    exclusive)."""
    audit = _audit(request)
    if (body.subject is not None or body.model is not None) and body.tenant is None:
        raise InvalidInput("a subject or model search needs its tenant")
    if body.version is not None and body.model is None:
        raise InvalidInput("a version search needs its model")
    if body.since is not None and body.until is not None and body.since > body.until:
        raise InvalidInput("since is after until")

    def search() -> dict[str, Any]:
        pseudonym = None
        if body.subject is not None and body.tenant is not None:
            pseudonym = audit.pseudonym(body.tenant, body.subject)
            if pseudonym is None:  # the tenant has no secret: the log holds nothing about anyone of it
                return {"events": [], "next_after": None}
        items, cursor = audit.log.search(
            tenant=body.tenant,
            pseudonym=pseudonym,
            model=body.model,
            version=body.version,
            kind=body.kind,
            since=body.since,
            until=body.until,
            after=body.after,
            limit=body.limit,
        )
        return {"events": [_shown(item) for item in items], "next_after": cursor}

    return json_response(await run_in_threadpool(search))


@router.post("/audit/verify", tags=["audit"], **needs("audit"))
async def verify_log(body: AuditVerify, request: Request) -> Response:
    """Recompute the tree from position ``from`` (default 0) to ``to`` (exclusive; default: the
    end) against every signed checkpoint in that range. ``ok`` false: ``findings`` name what does
    not match, the first position first; ``unverified_tail`` counts leaves after the last
    checkpoint (checked against their stored hashes only)."""
    audit = _audit(request)

    def verify() -> dict[str, Any]:
        size = audit.log.size()
        end = body.end
        if end is not None and end < body.start:
            raise InvalidInput("verify needs from <= to")
        if body.start > size or (end is not None and end > size):
            raise InvalidInput(f"the log holds {size} events; from and to are positions up to {size}")
        report = audit.log.verify(body.start, end)
        return {"from": body.start, "to": end if end is not None else body.start + report.size, **report.to_dict()}

    return json_response(await run_in_threadpool(verify))


@router.get("/audit/checkpoint", tags=["audit"], **needs("audit"))
async def latest_checkpoint(request: Request) -> Response:
    """The latest signed checkpoint (size, root, time, key id, signature; hex) and the public key
    that verifies it; 404 while none has been signed (the log is empty)."""
    audit = _audit(request)

    def latest() -> dict[str, Any]:
        found = audit.log.latest_checkpoint()
        if found is None:
            raise NotFound("no checkpoint has been signed yet: the decision log is empty")
        return audit.log.checkpoint_doc(found)

    return json_response(await run_in_threadpool(latest))


@router.get("/audit/checkpoints", tags=["audit"], **needs("audit"))
async def list_checkpoints(
    request: Request,
    after: int = Query(default=0, ge=0, le=MAX_POSITION, description="only checkpoints of a larger size"),
    limit: int = Query(default=100, ge=1, le=MAX_PAGE),
) -> Response:
    """Signed checkpoints by increasing size; ``next_after`` (a size) pages on. The keys that
    verify them: ``GET /admin/v1/audit/keys``."""
    audit = _audit(request)
    found = await run_in_threadpool(audit.log.checkpoints, after, limit)
    return json_response(
        {
            "checkpoints": [c.to_dict() for c in found],
            "next_after": found[-1].size if len(found) == limit else None,
        }
    )


@router.get("/audit/events/{event_id}/proof", tags=["audit"], **needs("audit"))
async def inclusion_proof(
    request: Request,
    event_id: str = Path(max_length=64, description=_ID_HELP),
    size: int | None = Query(
        default=None, ge=1, le=MAX_POSITION, description="the tree's size; default: the latest checkpoint's"
    ),
) -> Response:
    """The event's inclusion proof (RFC 9162 §2.1.3) in the tree of ``size`` leaves, with that
    size's signed checkpoint when there is one; 409 while no checkpoint covers the event yet."""
    return json_response(await run_in_threadpool(_audit(request).log.inclusion, event_id, size))


@router.get("/audit/consistency", tags=["audit"], **needs("audit"))
async def consistency_proof(
    request: Request,
    first: int = Query(ge=1, le=MAX_POSITION, description="the older tree's size"),
    second: int = Query(ge=1, le=MAX_POSITION, description="the newer tree's size (>= first)"),
) -> Response:
    """The consistency proof (RFC 9162 §2.1.4) that the tree of ``first`` leaves is a prefix of
    the tree of ``second`` leaves, with both roots."""
    if first > second:
        raise InvalidInput("a consistency proof needs first <= second")
    return json_response(await run_in_threadpool(_audit(request).log.consistency, first, second))


@router.get("/audit/leaves", tags=["audit"], **needs("audit"))
async def list_leaves(
    request: Request,
    start: int = Query(default=0, ge=0, le=MAX_POSITION, description="the first position"),
    limit: int = Query(default=MAX_PAGE, ge=1, le=MAX_PAGE),
) -> Response:
    """Raw leaves for an export, from position ``start``: each leaf's position, stored hash (hex)
    and canonical bytes (base64), and the frontier at ``start`` (the perfect-subtree hashes left
    of it, which a verifier starting there needs). ``next_start`` pages on."""
    audit = _audit(request)

    def page() -> dict[str, Any]:
        frontier = audit.log.frontier_at(start)  # 400 past the end of the log
        rows = audit.log.leaves_page(start, limit)
        return {
            "start": start,
            "size": audit.log.size(),
            "frontier": [node.hex() for node in frontier],
            "leaves": [{"position": p, "leaf_hash": h.hex(), "body": base64.b64encode(b).decode()} for p, b, h in rows],
            "next_start": rows[-1][0] + 1 if len(rows) == limit else None,
        }

    return json_response(await run_in_threadpool(page))


@router.get("/audit/keys", tags=["audit"], **needs("audit"))
async def public_keys(request: Request) -> Response:
    """The public key of every key that signed a checkpoint here (hex of the raw 32 bytes and
    PEM), and which one signs now. Publish them: an auditor verifies an export with them."""
    audit = _audit(request)
    found = await run_in_threadpool(audit.log.public_keys)
    keys = [{"key_id": kid, "public_key": raw.hex(), "pem": public_pem(raw)} for kid, raw in sorted(found.items())]
    return json_response({"keys": keys, "current": audit.signer.key_id})
