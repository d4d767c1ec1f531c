"""A model's guard policy (``bastion.guards``): what the gateway and the worker screen its text for.

Set by operators per model (``PUT /admin/v1/models/{name}/guards``, ``bastion models guards``),
validated by ``bastion.guards.parse_policy`` (an unknown key or a wrong value is a 400 naming it),
stored normalised (``GuardPolicy.to_dict()``) and shipped in the snapshot as the model's
``guards``. A model without one has every guard off.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.errors import InvalidInput, NotFound
from bastion.guards import parse_policy
from bastion.guards.policy import GuardPolicy
from bastion.registry.db import Sessions
from bastion.registry.lifecycle import record
from bastion.registry.tables import Model


def of(model: Model) -> dict[str, Any]:
    """The model's policy as a full dict (the defaults for a model that has none)."""
    return parse_policy(model.guards or {}).to_dict()


class Guards:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def get(self, model: str) -> dict[str, Any]:
        with self.sessions() as s:
            return {"model": model, "guards": of(_model(s, model))}

    def set(self, model: str, policy: Any, by: str) -> dict[str, Any]:
        """Replace the model's policy (every key left out goes back to its default: off)."""
        if not isinstance(policy, dict):
            raise InvalidInput("the guard policy is a JSON object")
        parsed: GuardPolicy = parse_policy(policy)
        with self.sessions.begin() as s:
            row = _model(s, model)
            row.guards = parsed.to_dict()
            record(s, row, 0, "guards_set", by, guards=row.guards)
            return {"model": model, "guards": row.guards}


def _model(s: Session, name: str) -> Model:
    row = s.scalar(select(Model).where(Model.name == name))
    if row is None:
        raise NotFound(f"no model {name!r}")
    return row
