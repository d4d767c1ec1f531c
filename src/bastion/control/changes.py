"""The unit of work: every state change of the admin API goes through ``run``.

``run`` makes the change and then, in the same SQL transaction, appends who made it to the admin
trail (``admin_changes``) and reads the next snapshot with its serial; it commits, and then
publishes that snapshot. So a change is never committed without its record, nor recorded without
having been made, and the published snapshot includes it. Units run one at a time (each holds the
snapshot serial's row lock from its start to its commit, ``Registry.unit``), and Redis keeps only
the highest serial, so the newest state always wins. Handlers never commit, record or publish by
hand; slow work (checking an upload, warming versions up on the workers, replaying up to 1,000
dead letters) is done before the unit, which then records it.

If Redis is unreachable when the snapshot is published, the call answers 503 but the change
stands (it is committed and recorded); the control plane's reconcile loop (``ControlPlane.
reconcile``) publishes it within one refresh period once Redis is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi.concurrency import run_in_threadpool

from bastion import logs
from bastion.control.plane import ControlPlane

T = TypeVar("T")
Detail = dict[str, Any] | Callable[[Any], dict[str, Any]] | None
Resource = tuple[str, str | Callable[[Any], str]]  # kind, and the name (or a function of the result)

log = logs.get("bastion.control")


def republish(plane: ControlPlane, caller: dict[str, Any]) -> int:
    """Publish the snapshot again (a recorded change of its own); the serial Redis holds now."""
    _, serial = _unit(plane, caller, "snapshot.publish", ("snapshot", "current"), lambda: None, None, True)
    return serial or 0


def _unit(
    plane: ControlPlane,
    caller: dict[str, Any],
    action: str,
    resource: Resource,
    change: Callable[[], T],
    detail: Detail,
    publish: bool,
) -> tuple[T, int | None]:
    kind, named = resource
    with plane.registry.unit():
        result = change()
        name = named(result) if callable(named) else named
        found = detail(result) if callable(detail) else detail
        change_id = plane.registry.trail.append(str(caller["id"]), action, kind, name, found)
        data = plane.registry.snapshot() if publish else None
    log.info("admin_change", change_id=change_id, action=action, kind=kind, name=name, by=caller["id"])
    return result, plane.publish_data(data) if data is not None else None


async def run(
    plane: ControlPlane,
    caller: dict[str, Any],
    action: str,
    resource: Resource,
    change: Callable[[], T],
    *,
    detail: Detail = None,
    publish: bool = True,
) -> T:
    """Make ``change`` (registry calls; they join one transaction), record it as ``action`` on
    ``resource`` (kind, name; the name may be a function of the change's result) by ``caller``
    with ``detail`` (a dict, or a function of the change's result; never a secret), commit, and
    publish the new snapshot (``publish=False``: the change is invisible to gateways and workers,
    e.g. a gate policy). The unit runs on one worker thread (its transaction lives there)."""

    def unit() -> T:
        return _unit(plane, caller, action, resource, change, detail, publish)[0]

    return await run_in_threadpool(unit)
