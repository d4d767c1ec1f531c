"""Dead-lettered jobs of a model: list them (never their inputs) and queue async ones again.

A letter whose input was too large to keep (``dead_letter_max_input_bytes``) is listed with its
size and digest and ``replayable: false``; asking to replay it by id is a 409 and replays nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import plane_of, redis_errors
from bastion.control.principals import needs, principal
from bastion.control.schemas import ReplayRequest
from bastion.errors import Conflict
from bastion.queue import deadletters
from bastion.responses import json_response
from bastion.timefmt import iso_utc

router = APIRouter()
_UNAVAILABLE = "dead letters are unavailable"


def _shown(letter: dict[str, Any]) -> dict[str, Any]:
    """A letter with its times in the API's form: ``created_at`` (when the job was submitted) and
    ``dead_lettered_at`` (the letter's stream id is the millisecond it was written)."""
    out = {k: v for k, v in letter.items() if k != "created_ms"}
    created_ms = letter.get("created_ms")
    out["created_at"] = iso_utc(created_ms / 1000) if created_ms else None
    written_ms = str(letter["id"]).partition("-")[0]
    out["dead_lettered_at"] = iso_utc(int(written_ms) / 1000) if written_ms.isdigit() else None
    return out


@router.get("/models/{name}/dead-letters", tags=["jobs"], **needs("deploy"))
async def dead_letters(name: str, request: Request, count: int = Query(default=100, ge=1, le=10_000)) -> Response:
    """The newest dead-lettered jobs of the model (ids, tenant, version, reason; never their inputs);
    ``created_at`` and ``dead_lettered_at`` are ISO 8601 UTC."""
    plane = plane_of(request)
    await run_in_threadpool(plane.registry.get_model, name)

    def listing() -> list[dict[str, Any]]:
        with redis_errors(_UNAVAILABLE):
            return [_shown(letter) for letter in deadletters.listing(plane.redis, name, count)]

    return json_response({"model": name, "dead_letters": await run_in_threadpool(listing)})


@router.post("/models/{name}/dead-letters/replay", tags=["jobs"], **needs("deploy"))
async def replay_dead_letters(
    name: str,
    body: ReplayRequest,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Queue dead-lettered async jobs again (all of the newest 1,000 when no ids are given, those
    that kept their input). Naming a letter that kept no copy of its input is a 409."""
    plane = plane_of(request)

    def replay() -> dict[str, Any]:
        plane.registry.get_model(name)
        with redis_errors(_UNAVAILABLE):
            if body.ids:
                unusable = deadletters.not_replayable(plane.redis, name, body.ids)
                if unusable:
                    raise Conflict(
                        f"{len(unusable)} of the dead letters kept no copy of their job's input (it was over "
                        f"{plane.settings.dead_letter_max_input_bytes} bytes; the letter keeps its size and SHA-256): "
                        f"they cannot be replayed, and nothing was replayed: {', '.join(unusable[:10])}"
                    )
            ids = body.ids or [d["id"] for d in deadletters.listing(plane.redis, name, 1000) if d["replayable"]]
            return dict(deadletters.replay(plane.redis, name, ids, plane.settings.result_ttl_s))

    # Redis work first, outside the unit of work: up to 1,000 script calls must not hold the
    # registry's write lock (every other admin change waits on it); the unit then records it.
    counts = await run_in_threadpool(replay)
    await changes.run(
        plane, admin, "deadletters.replay", ("model", name), lambda: counts, detail=dict(counts), publish=False
    )
    return json_response({"model": name, **counts})
