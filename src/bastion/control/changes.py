"""The unit of work: every state change of the admin API goes through ``run``.

``run`` makes the change and then, in the same SQL transaction, appends who made it to the admin
trail (``admin_changes``) and reads the next snapshot with its serial; it commits, and then
publishes that snapshot. So a change is never committed without its record, nor recorded without
having been made, and the published snapshot includes it. Units run one at a time (each holds the
snapshot serial's row lock from its start to its commit, ``Registry.unit``), and Redis keeps only
the highest serial, so the newest state always wins. Handlers never commit, record or publish by
hand; slow work (checking an upload, warming versions up on the workers, replaying up to 1,000
dead letters) is done before the unit, which then records it.

Each record made while serving an admin request also names the request (``call_detail``): its
route template (``POST /admin/v1/models/{name}/versions``) and the SHA-256 of its body exactly as
received (digested by ``AdminGate`` as it streamed through; the rest of a body the route did not
read is read first), in the record's ``route`` and ``body_sha256``. The decision log lifts both
into the change's admin event. A body that names a data subject is never digested into the
record (``body_digest=False``: a plain hash of a short identifier is as good as the identifier).

If Redis is unreachable when the snapshot is published, the call answers 503 but the change
stands (it is committed and recorded); the control plane's reconcile loop (``ControlPlane.
reconcile``) publishes it within one refresh period once Redis is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import anyio.from_thread
from fastapi.concurrency import run_in_threadpool

from bastion import logs
from bastion.control.gate import current_call
from bastion.control.plane import ControlPlane

T = TypeVar("T")
Detail = dict[str, Any] | Callable[[Any], dict[str, Any]] | None
Resource = tuple[str, str | Callable[[Any], str]]  # kind, and the name (or a function of the result)

log = logs.get("bastion.control")
WITHHELD = "withheld: the body names a data subject"


def call_detail(*, body_digest: bool = True) -> dict[str, Any]:
    """What a record says about the admin request being served: ``route`` (method and route
    template) and ``body_sha256`` (hex; null if the body was not received whole), or, with
    ``body_digest=False``, ``body`` saying why there is no digest. Empty outside a request."""
    call = current_call()
    if call is None:
        return {}
    if not body_digest:
        return {"route": call.route, "body": WITHHELD}
    return {"route": call.route, "body_sha256": call.body_sha256}


def _drained_here() -> None:
    """On a worker thread of the request's event loop: read the rest of the body first, so that
    its digest is complete (a route that reads no body, given one anyway)."""
    call = current_call()
    if call is None or call.body_sha256 is not None:
        return
    try:
        anyio.from_thread.run(call.drain)
    except RuntimeError:  # not on a worker thread of an event loop: recorded without a digest
        pass


def republish(plane: ControlPlane, caller: dict[str, Any]) -> int:
    """Publish the snapshot again (a recorded change of its own); the serial Redis holds now."""
    _drained_here()
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
    body_digest: bool = True,
) -> tuple[T, int | None]:
    kind, named = resource
    request = call_detail(body_digest=body_digest)
    with plane.registry.unit():
        result = change()
        name = named(result) if callable(named) else named
        found = detail(result) if callable(detail) else detail
        recorded = {**(found or {}), **request}
        change_id = plane.registry.trail.append(str(caller["id"]), action, kind, name, recorded or None)
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
    body_digest: bool = True,
) -> T:
    """Make ``change`` (registry calls; they join one transaction), record it as ``action`` on
    ``resource`` (kind, name; the name may be a function of the change's result) by ``caller``
    with ``detail`` (a dict, or a function of the change's result; never a secret) and the
    request's route and body digest (``call_detail``; ``body_digest=False`` for a body that
    names a data subject), commit, and publish the new snapshot (``publish=False``: the change
    is invisible to gateways and workers, e.g. a gate policy). The unit runs on one worker
    thread (its transaction lives there)."""
    call = current_call()
    if call is not None and body_digest:
        await call.drain()  # the whole body digested before the record is made

    def unit() -> T:
        return _unit(plane, caller, action, resource, change, detail, publish, body_digest)[0]

    return await run_in_threadpool(unit)
