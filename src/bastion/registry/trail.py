"""The admin trail: an append-only record of who changed what through the admin API.

One row per state-changing admin call (``admin_changes``): when, the principal's id, the action
(``key.create``, ``deployment.rollback``...), the kind and name of the resource, and a detail
document. A change made while serving an admin request also names the request in its detail:
``route`` (``POST /admin/v1/models/{name}/versions``) and ``body_sha256`` (or ``body``, saying
why there is no digest); ``listing`` shows them beside the detail, as the decision log's admin
events do. The trail never holds a secret: detail fields that could (``key``, ``secret``...) are
dropped before the row is written. Rows are only ever added; readers page by id.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from bastion.registry.db import Sessions
from bastion.registry.tables import AdminChange
from bastion.timefmt import iso_utc

_SECRET_FIELDS = frozenset({"key", "secret", "plaintext", "token", "password", "digest"})
_REQUEST_FIELDS = ("route", "body_sha256", "body")  # what a change says of the request that made it
MAX_PAGE = 1000


def scrubbed(detail: Any) -> Any:
    """``detail`` without any field named like a secret, at any depth."""
    if isinstance(detail, dict):
        return {k: scrubbed(v) for k, v in detail.items() if str(k).lower() not in _SECRET_FIELDS}
    if isinstance(detail, list | tuple):
        return [scrubbed(v) for v in detail]
    return detail


class Trail:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def append(self, principal_id: str, action: str, kind: str, name: str, detail: dict[str, Any] | None = None) -> int:
        """Add one change (inside a unit of work: in the unit's transaction); its id."""
        with self.sessions.begin() as s:
            row = AdminChange(
                principal_id=principal_id[:64],
                action=action[:48],
                resource_kind=kind[:32],
                resource_name=name[:160],
                detail=scrubbed(detail) if detail else None,
            )
            s.add(row)
            s.flush()
            return int(row.id)

    def listing(self, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Changes with an id above ``after``, oldest first, at most ``limit``."""
        limit = max(1, min(limit, MAX_PAGE))
        with self.sessions() as s:
            rows = s.scalars(select(AdminChange).where(AdminChange.id > after).order_by(AdminChange.id).limit(limit))
            return [_view(r) for r in rows]


def _view(row: AdminChange) -> dict[str, Any]:
    """A change as listed: the request's route and body digest beside its detail."""
    detail = dict(row.detail or {})
    request = {name: detail.pop(name) for name in _REQUEST_FIELDS if name in detail}
    return {
        "id": row.id,
        "at": iso_utc(row.at),
        "principal": row.principal_id,
        "action": row.action,
        "resource": {"kind": row.resource_kind, "name": row.resource_name},
        **request,
        "detail": detail,
    }
