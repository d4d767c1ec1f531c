"""Choose the version that answers a request: policy rules, weights sticky per subject, kill switch.

1. Policy: every rule that applies to the caller (its tenant, its tenant's jurisdiction, or a
   consent flag its tenant lacks - all set by operators, never by a client header) narrows the
   versions it may reach to the rule's ``allow`` list. A caller no route is allowed for gets the
   fallback if that is allowed, else a 403 problem saying which rule stopped it.
2. Kill switch: a disabled model answers with its (allowed) fallback, or 503.
3. Weights: the subject (the caller's own identity - its key id or token subject - or, for a
   key operators marked ``subject_trusted``, its ``X-Bastion-Subject``) is hashed with the model
   name into a bucket in ``[0, total weight)`` of the allowed routes, which own consecutive ranges in their
   order. The same subject keeps its version while the weights stand; distinct subjects split in
   proportion to the weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bastion.errors import Forbidden, NotFound, Unavailable
from bastion.snapshot import ModelRoutes, Route, Rule, VersionInfo


@dataclass(slots=True)  # one per request: not frozen, whose __init__ is slower
class Routed:
    """The version that answers a caller, and why: its ``role`` (``primary``, ``canary`` or
    ``fallback``), the ``reason`` a fallback answers (``disabled``: the kill switch; ``policy``:
    no routed version is allowed for the caller), the policy ``rule`` that applied ('' none) and
    the versions policy lets this caller reach (None: any)."""

    version: VersionInfo
    role: str
    reason: str = ""
    rule: str = ""
    allowed: frozenset[int] | None = None

    def permits(self, version: int) -> bool:
        """Whether policy lets this caller's data reach ``version`` (a shadow copy included)."""
        return self.allowed is None or version in self.allowed


def shadowed(model: str, route: Route, subject: str) -> bool:
    """Whether this subject's requests are copied to a shadow route (its weight is a percentage)."""
    return route.weight >= 100 or bucket(f"{model}:shadow:{route.version.version}", subject, 100) < route.weight


def bucket(model: str, subject: str, total: int) -> int:
    digest = hashlib.blake2b(f"{model}\x00{subject}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % total


def choose(
    model: str,
    routes: ModelRoutes | None,
    subject: str,
    tenant: str = "",
    jurisdiction: str | None = None,
    consents: frozenset[str] = frozenset(),
) -> Routed:
    """The version for this caller and subject, or NotFound / Forbidden / Unavailable."""
    if routes is None:
        raise NotFound(f"no model {model!r} is being served", model=model)
    if not routes.rules and not routes.disabled and len(routes.routes) == 1:
        only = routes.routes[0]  # the common case: one production version, no policy
        if only.role != "shadow":
            return Routed(only.version, only.role)
    allowed, stopped_by = _allowed(routes, tenant, jurisdiction, consents)
    rule = "; ".join(stopped_by)
    fallback = routes.fallback
    if fallback is not None and allowed is not None and fallback.version not in allowed:
        fallback = None
    if routes.disabled:
        if fallback is not None:
            return Routed(fallback, "fallback", "disabled", rule, allowed)
        raise Unavailable(f"model {model!r} is disabled by its operators", retry_after=30, model=model)
    candidates = [r for r in routes.routes if r.role != "shadow" and (allowed is None or r.version.version in allowed)]
    if not candidates:
        if fallback is not None:
            return Routed(fallback, "fallback", "policy", rule, allowed)
        raise Forbidden(
            f"policy ({rule}) allows this caller only version(s) {sorted(allowed or [])} "
            f"of model {model!r}, and none of them is deployed",
            model=model,
        )
    route = _weighted(model, candidates, subject)
    return Routed(route.version, route.role, "", rule, allowed)


def choose_version(
    model: str,
    routes: ModelRoutes | None,
    version: int,
    tenant: str = "",
    jurisdiction: str | None = None,
    consents: frozenset[str] = frozenset(),
) -> Routed:
    """A version the caller named (OIP ``/versions/{v}``, gRPC ``model_version``): only one that
    takes traffic (a primary or canary route, or the fallback; never a shadow or an undeployed
    version: those are NotFound, whether or not they exist) and that policy lets this caller reach
    (else the same NotFound: naming versions reveals nothing of other tenants' versions, whether
    or not a route with a weight names them). The kill switch holds: only the fallback answers then."""
    if routes is None:
        raise NotFound(f"no model {model!r} is being served", model=model)
    live = live_routes(routes)
    fallback = routes.fallback
    allowed, stopped_by = _allowed(routes, tenant, jurisdiction, consents)
    rule = "; ".join(stopped_by)
    if (version not in live and (fallback is None or fallback.version != version)) or (
        allowed is not None and version not in allowed
    ):  # one answer for "none", "not deployed" and "not for you": no oracle of other tenants' versions
        raise NotFound(f"model {model!r} has no version {version} taking traffic", model=model)
    if fallback is not None and fallback.version == version and (routes.disabled or version not in live):
        return Routed(fallback, "fallback", "disabled" if routes.disabled else "", rule, allowed)
    if routes.disabled:
        raise Unavailable(f"model {model!r} is disabled by its operators", retry_after=30, model=model)
    named = live[version]
    return Routed(named.version, named.role, "", rule, allowed)


def live_routes(routes: ModelRoutes) -> dict[int, Route]:
    """The routes that take traffic, by version: primaries and canaries with a weight (never a
    shadow, never a route at weight 0)."""
    return {r.version.version: r for r in routes.routes if r.role != "shadow" and r.weight > 0}


def reachable_versions(routes: ModelRoutes, allowed: frozenset[int] | None) -> list[int]:
    """The versions a caller may name: those taking traffic and the fallback, within its policy."""
    found = set(live_routes(routes))
    if routes.fallback is not None:
        found.add(routes.fallback.version)
    return sorted(v for v in found if allowed is None or v in allowed)


def alternatives(routes: ModelRoutes, failing: int, allowed: frozenset[int] | None) -> list[VersionInfo]:
    """Where a call goes when version ``failing`` cannot take it: the fallback, then the primary
    (a failing canary's calls go back to the primary; never while the kill switch is on), each
    only if policy lets this caller in (``allowed``, from ``Routed``; None: any version)."""
    found: list[VersionInfo] = []
    primaries = [] if routes.disabled else [r.version for r in routes.routes if r.role == "primary"]
    for v in [routes.fallback, *primaries]:
        if v is None or v.version == failing or any(f.version == v.version for f in found):
            continue
        if allowed is None or v.version in allowed:
            found.append(v)
    return found


def _allowed(
    routes: ModelRoutes, tenant: str, jurisdiction: str | None, consents: frozenset[str]
) -> tuple[frozenset[int] | None, list[str]]:
    """The versions the policy rules that apply to this caller allow (None: no rule applies)."""
    allowed: frozenset[int] | None = None
    stopped_by: list[str] = []
    for rule in routes.rules:
        if rule.applies(tenant, jurisdiction, consents):
            allowed = rule.allow if allowed is None else allowed & rule.allow
            stopped_by.append(_describe(rule))
    return allowed, stopped_by


def _describe(rule: Rule) -> str:
    parts = [f"tenant {rule.tenant}"] if rule.tenant else []
    if rule.jurisdiction:
        parts.append(f"jurisdiction {rule.jurisdiction}")
    if rule.without_consent:
        parts.append(f"without consent '{rule.without_consent}'")
    return " and ".join(parts)


def _weighted(model: str, routes: list[Route], subject: str) -> Route:
    total = sum(r.weight for r in routes)
    if total <= 0:
        raise NotFound(f"no model {model!r} is being served", model=model)
    point = bucket(model, subject, total) if len(routes) > 1 else 0
    for route in routes:
        if point < route.weight:
            return route
        point -= route.weight
    return routes[-1]  # unreachable: the weights cover [0, total)
