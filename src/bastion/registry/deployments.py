"""Deployments: which versions of a model take traffic, in what share, and the kill switch.

A deployment is a list of routes ``{version, weight, role}`` with exactly one ``primary``
(the production version) and any number of ``canary`` routes; weights split the traffic
(sticky per subject, decided at the gateway). A ``shadow`` route receives a copy of that
percentage (its weight, 0-100) of answered requests on the batch lane; its outputs are compared
with the answer's and never returned. A ``fallback`` version answers while the model
is disabled. Every change is appended to ``deployment_events``; ``rollback`` reads that history
(see ``Deployments.rollback``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from bastion.errors import Conflict, InvalidInput, NotFound
from bastion.registry.db import Sessions
from bastion.registry.metadata import GatePolicy
from bastion.registry.tables import Deployment, DeploymentEvent, Model, ModelVersion
from bastion.timefmt import iso_utc

ROLES = ("primary", "canary", "shadow")
_RULE_KEYS = ("jurisdiction", "tenant", "without_consent")


def normalise_routes(routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not routes:
        raise InvalidInput("a deployment needs at least one route")
    out = []
    for route in routes:
        role = route.get("role", "primary")
        if role not in ROLES:
            raise InvalidInput(f"route role {role!r} is not one of {list(ROLES)}")
        version, weight = route.get("version"), route.get("weight", 100)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidInput("route version must be a positive integer")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 10_000:
            raise InvalidInput("route weight must be an integer from 0 to 10000")
        out.append({"version": version, "weight": weight, "role": role})
    if sum(r["role"] == "primary" for r in out) != 1:
        raise InvalidInput("a deployment needs exactly one primary route")
    if len({r["version"] for r in out}) != len(out):
        raise InvalidInput("a version appears in more than one route")
    if sum(r["weight"] for r in out if r["role"] != "shadow") == 0:
        raise InvalidInput("the route weights add up to zero")
    if any(r["role"] == "shadow" and r["weight"] > 100 for r in out):
        raise InvalidInput("a shadow route's weight is the percentage of requests copied to it (0 to 100)")
    return out


def normalise_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Policy rules: ``{"jurisdiction": "EU", "allow": [1, 3]}``, ``{"tenant": "acme", "allow": [2]}``
    or ``{"without_consent": "profiling", "allow": [1]}``.

    A rule applies to a caller whose tenant, tenant's jurisdiction and tenant's consent flags
    (all set by operators, never by a client header) match; a caller may reach only the versions
    every applying rule allows.
    """
    out = []
    for rule in rules:
        when = {k: rule[k] for k in _RULE_KEYS if rule.get(k) is not None}
        if not when:
            raise InvalidInput("a policy rule needs a 'jurisdiction', a 'tenant' or a 'without_consent'")
        if any(not isinstance(v, str) or not 0 < len(v) <= 64 for v in when.values()):
            raise InvalidInput("a policy rule's jurisdiction and tenant are short strings")
        allow = rule.get("allow")
        if not isinstance(allow, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in allow):
            raise InvalidInput("a policy rule's 'allow' is a list of version numbers")
        unknown = set(rule) - {*_RULE_KEYS, "allow"}
        if unknown:
            raise InvalidInput(f"a policy rule has unknown fields {sorted(unknown)}")
        out.append({**when, "allow": sorted(set(allow))})
    return out


class Deployments:
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def get(self, model: str) -> dict[str, Any]:
        with self.sessions() as s:
            row, dep = self._load(s, model)
            return _view(row, dep)

    def deploy(
        self,
        model: str,
        routes: list[dict[str, Any]],
        fallback: int | None,
        by: str,
        action: str = "deploy",
        rules: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        routes = normalise_routes(routes)
        rules = normalise_rules(rules or [])
        with self.sessions.begin() as s:
            row, found = self._load(s, model)
            self._check(s, row, routes, fallback, rules)
            dep = found or Deployment(model_id=row.id, routes=[], disabled=False)
            s.add(dep)
            dep.routes, dep.fallback_version, dep.rules = routes, fallback, rules
            return self._record(s, row, dep, action, by)

    def promote(self, model: str, version: int, by: str) -> dict[str, Any]:
        """``version`` takes all traffic as the primary; the fallback and policy rules stay."""
        dep = self.get(model)
        fallback = dep["fallback_version"] if dep["fallback_version"] != version else None
        route = {"version": version, "weight": 100, "role": "primary"}
        return self.deploy(model, [route], fallback, by, action="promote", rules=dep["rules"])

    def check(
        self, model: str, routes: list[dict[str, Any]], fallback: int | None, rules: list[dict[str, Any]]
    ) -> None:
        """Raise what ``deploy`` would raise for this deployment, changing nothing."""
        with self.sessions() as s:
            row, _ = self._load(s, model)
            self._check(s, row, normalise_routes(routes), fallback, normalise_rules(rules))

    def _check(
        self, s: Session, row: Model, routes: list[dict[str, Any]], fallback: int | None, rules: list[dict[str, Any]]
    ) -> None:
        named = [r["version"] for r in routes] + [v for rule in rules for v in rule["allow"]]
        self._check_versions(s, row, named + ([fallback] if fallback else []))
        self._check_stages(s, row, routes, fallback)

    def set_disabled(self, model: str, disabled: bool, by: str) -> dict[str, Any]:
        with self.sessions.begin() as s:
            row, dep = self._load(s, model)
            if dep is None:
                raise Conflict(f"model {model!r} has no deployment")
            dep.disabled = disabled
            return self._record(s, row, dep, "disable" if disabled else "enable", by)

    def rollback(self, model: str, by: str) -> dict[str, Any]:
        """Send all traffic back to a version that served before, in one call.

        * With canary or shadow routes live, they are dropped: all traffic goes to the primary.
        * Otherwise traffic goes to the most recent earlier primary, and each further rollback
          steps one further back: a version rolled back from is never returned to by another
          rollback (deploy it again to bring it back). The history is the primaries in the order
          they last took over (``deployment_events``); versions that may not be primary now
          (retired, or outside ``production`` on a gated model) are passed over. With no earlier
          version left, the rollback is refused (409) and nothing changes.

        The kill switch, the fallback version and the policy rules stay as they are: rolling back a
        disabled model leaves it disabled.
        """
        with self.sessions.begin() as s:
            row, dep = self._load(s, model)
            if dep is None:
                raise Conflict(f"model {model!r} has no deployment")
            primary = next(r["version"] for r in dep.routes if r["role"] == "primary")
            if len(dep.routes) > 1:
                target = primary  # canaries live: all traffic back to the production version
            else:
                target = self._previous_primary(s, row, primary)
            routes = [{"version": target, "weight": 100, "role": "primary"}]
            self._check_stages(s, row, routes, None)  # the target only: an emergency path is never
            dep.routes = routes  # blocked by a fallback that was retired or a model gated since
            return self._record(s, row, dep, "rollback", by)

    # helpers -----------------------------------------------------------------------------
    def _load(self, s: Session, model: str) -> tuple[Model, Deployment | None]:
        row = s.scalar(select(Model).where(Model.name == model))
        if row is None:
            raise NotFound(f"no model {model!r}")
        return row, s.get(Deployment, row.id)

    def _check_versions(self, s: Session, row: Model, versions: list[int]) -> None:
        known = set(s.scalars(select(ModelVersion.version).where(ModelVersion.model_id == row.id)))
        missing = sorted(set(versions) - known)
        if missing:
            raise InvalidInput(f"model {row.name!r} has no version(s) {missing}")

    def _check_stages(self, s: Session, row: Model, routes: list[dict[str, Any]], fallback: int | None) -> None:
        """Retired versions take no traffic; on a gated model, primary and fallback are in production,
        canaries and shadows in staging or production."""
        stages = dict(
            s.execute(select(ModelVersion.version, ModelVersion.stage).where(ModelVersion.model_id == row.id)).all()
        )
        gated = GatePolicy.model_validate(row.policy or {}).gated
        wanted = [(r["version"], r["role"]) for r in routes] + ([(fallback, "fallback")] if fallback else [])
        for version, role in wanted:
            stage = stages[version]
            if stage == "retired":
                raise Conflict(f"version {version} of model {row.name!r} is retired and takes no traffic")
            allowed = ("production",) if role in ("primary", "fallback") else ("staging", "production")
            if gated and stage not in allowed:
                raise Conflict(
                    f"model {row.name!r} has promotion gates: a {role} version must be in {' or '.join(allowed)}; "
                    f"version {version} is {stage}"
                )

    def _previous_primary(self, s: Session, row: Model, current: int) -> int:
        stages = dict(
            s.execute(select(ModelVersion.version, ModelVersion.stage).where(ModelVersion.model_id == row.id)).all()
        )
        gated = GatePolicy.model_validate(row.policy or {}).gated
        history = _primaries(
            s.scalars(select(DeploymentEvent).where(DeploymentEvent.model_id == row.id).order_by(DeploymentEvent.id))
        )
        if history and history[-1] == current:
            history.pop()
        for version in reversed(history):
            stage = stages.get(version)
            if stage is not None and stage != "retired" and (not gated or stage == "production"):
                return version
        raise Conflict(f"model {row.name!r} has no earlier production version to roll back to")

    def _record(self, s: Session, row: Model, dep: Deployment, action: str, by: str) -> dict[str, Any]:
        dep.updated_by, dep.updated_at = by[:64], datetime.now(UTC)
        row.current_version = next(r["version"] for r in dep.routes if r["role"] == "primary")
        s.add(
            DeploymentEvent(
                model_id=row.id,
                action=action,
                routes=list(dep.routes),
                rules=list(dep.rules or []),
                fallback_version=dep.fallback_version,
                disabled=dep.disabled,
                created_by=by[:64],
            )
        )
        s.flush()
        return _view(row, dep)


def _primaries(events: Any) -> list[int]:
    """The rollback history: primary versions, oldest first, each where it last took over.

    A deploy or promotion puts its primary on top (moving it up if it served before); a rollback
    event takes versions off the top until its own target is on top again, so a version rolled
    back from is no longer in the history and the next rollback goes further back."""
    stack: list[int] = []
    for event in events:
        primary = next((int(r["version"]) for r in event.routes if r["role"] == "primary"), None)
        if primary is None:
            continue
        if event.action == "rollback":
            while stack and stack[-1] != primary:
                stack.pop()
            if not stack:
                stack.append(primary)
        elif not stack or stack[-1] != primary:
            if primary in stack:
                stack.remove(primary)
            stack.append(primary)
    return stack


def _view(row: Model, dep: Deployment | None) -> dict[str, Any]:
    if dep is None:
        return {"model": row.name, "routes": [], "rules": [], "fallback_version": None, "disabled": False}
    return {
        "model": row.name,
        "routes": dep.routes,
        "rules": dep.rules or [],
        "fallback_version": dep.fallback_version,
        "disabled": dep.disabled,
        "updated_by": dep.updated_by,
        "updated_at": iso_utc(dep.updated_at),
    }
