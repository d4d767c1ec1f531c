"""Data-subject rights (scope ``audit``): erase a subject's payloads, export every decision about it.

The subject is named in the body, never in the URL (access logs keep URLs), and only within its
tenant: the same subject string under another tenant is another subject. Neither the subject nor
a digest of a body naming it reaches the admin trail: records name the subject by its pseudonym.
An export is a disclosure of personal data, so it is recorded (``subject.export``) like a change.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import plane_of
from bastion.control.principals import needs, principal
from bastion.control.schemas import SubjectRequest
from bastion.responses import json_response

router = APIRouter()
_TENANT = Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="the subject's tenant")


@router.post("/tenants/{tenant}/subjects/erase", tags=["audit"], **needs("audit"))
async def erase_subject(
    body: SubjectRequest,
    request: Request,
    tenant: str = _TENANT,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Erase the subject (GDPR art. 17): destroy its data keys, so that every payload kept for it
    becomes unreadable while the log still verifies; record an ``erasure`` event (the subject by
    its pseudonym); remove what Redis still holds for it (job results, idempotency records,
    cached responses, reply-stream entries, dead letters) and rewrite Redis's persistence files
    without it. Erasing again is harmless. 404 for an unknown tenant."""
    plane = plane_of(request)
    erase = plane.audit.subjects.erase
    request_detail = changes.call_detail(body_digest=False)  # the route; never a digest of the subject
    report = await run_in_threadpool(erase, tenant, body.subject, str(admin["id"]), request_detail)
    return json_response(report)


@router.post("/tenants/{tenant}/subjects/export", tags=["audit"], **needs("audit"))
async def export_subject(
    body: SubjectRequest,
    request: Request,
    tenant: str = _TENANT,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Every decision about the subject (GDPR art. 15), oldest first: each event with its
    payload decrypted where it is still kept (``state``: ``kept``, ``erased``, ``expired`` or
    ``none``). Nothing about any other tenant's subjects. 404 for an unknown tenant."""
    plane = plane_of(request)
    audit = plane.audit

    def export() -> dict[str, Any]:
        decisions = audit.subjects.export(tenant, body.subject)
        return {"tenant": tenant, "subject_pseudonym": audit.pseudonym(tenant, body.subject), "decisions": decisions}

    found = await run_in_threadpool(export)  # reads and decrypts: before (outside) the unit of work
    pseudonym = found["subject_pseudonym"] or "unknown"
    await changes.run(
        plane,
        admin,
        "subject.export",
        ("subject", pseudonym),
        lambda: found,
        detail={"tenant": tenant, "subject": pseudonym, "decisions": len(found["decisions"])},
        publish=False,
        body_digest=False,
    )
    return json_response(found)
