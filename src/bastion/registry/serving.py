"""How a model is served: its default deadline, queue limits and response cache.

Set by operators per model (``PUT /admin/v1/models/{name}/serving``); gateways read it from the
snapshot. Unset fields fall back to the process settings (``--request-timeout-s``,
``--max-queue-sync``, ``--max-queue-batch``); the cache is off unless ``cache_ttl_s`` is set.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.errors import NotFound
from bastion.registry.db import Sessions
from bastion.registry.lifecycle import record
from bastion.registry.metadata import parse
from bastion.registry.tables import Model


class ServingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="default deadline of a sync call (capped by --request-timeout-s)"
    )
    max_queue_sync: int | None = Field(
        default=None, ge=1, description="jobs waiting on the sync lane beyond which calls get 503 at once"
    )
    max_queue_batch: int | None = Field(
        default=None, ge=1, description="jobs waiting on the async lane beyond which submissions get 503"
    )
    cache_ttl_s: int = Field(
        default=0, ge=0, le=86_400, description="answer identical inputs from a per-tenant cache this long; 0: off"
    )


def of(model: Model) -> ServingOptions:
    return ServingOptions.model_validate(model.serving or {})


class Serving:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def get(self, model: str) -> dict[str, Any]:
        with self.sessions() as s:
            return {"model": model, "serving": of(_model(s, model)).model_dump()}

    def set(self, model: str, options: Any, by: str) -> dict[str, Any]:
        parsed = parse(ServingOptions, options, "the serving options")
        with self.sessions.begin() as s:
            row = _model(s, model)
            row.serving = parsed.model_dump(exclude_none=True)
            record(s, row, 0, "serving_set", by, serving=row.serving)
            return {"model": model, "serving": parsed.model_dump()}


def _model(s: Session, name: str) -> Model:
    row = s.scalar(select(Model).where(Model.name == name))
    if row is None:
        raise NotFound(f"no model {name!r}")
    return row
