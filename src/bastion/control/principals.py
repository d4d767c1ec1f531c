"""Who is calling the admin API, and what it may do.

A principal is the ``BASTION_ADMIN_KEY`` (scope ``admin``) or a live key of the operators' tenant,
resolved from the ``Authorization`` header alone (``resolve``) before any body is read
(``bastion.control.gate``); routes read it through the ``principal`` dependency.
``admin`` holds every scope; ``audit`` reads the decision log and answers data-subject requests
(erasure, access): like every admin scope it serves operators only, since a tenant's key holding
it never reaches these routes. A route needs one scope (``needs``); a key change also needs the
caller to hold every scope of the key it creates, rotates or revokes (``may_grant``), so that no
principal can make, obtain or take away a key more powerful than itself: ``admin`` is granted only
by an ``admin`` principal.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from bastion.constants import OPERATORS_TENANT, SCOPES
from bastion.control.plane import ControlPlane, plane_of
from bastion.errors import Forbidden, Unauthenticated
from bastion.security import apikeys, oidc

ENV_ADMIN = "env-admin"  # the principal id of BASTION_ADMIN_KEY
STATE_KEY = "principal"  # where ``AdminGate`` leaves the resolved principal in ``scope["state"]``


def client_cn(scope: Any) -> str | None:
    """The common name of the verified client certificate of this request's connection, if any."""
    found = (scope.get("extensions") or {}).get("tls") or {}
    value = found.get("client_cn")
    return value if isinstance(value, str) else None


def cert_principals(spec: str) -> dict[str, list[str]]:
    """``admin_cert_principals`` (``CN=scope[+scope],...``) as common name -> scopes; ValueError
    for an entry it cannot read or a scope Bastion does not know (the control plane checks at start)."""
    found: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, scopes = item.partition("=")
        held = [s.strip() for s in scopes.split("+") if s.strip()]
        unknown = set(held) - set(SCOPES) - {"admin"}
        if not name.strip() or not held or unknown:
            raise ValueError(f"BASTION_ADMIN_CERT_PRINCIPALS: cannot read {item!r} (CN=scope[+scope])")
        found[name.strip()] = held
    return found


def resolve(plane: ControlPlane, authorization: str | None, cn: str | None = None) -> dict[str, Any]:
    """Who is calling: a Bearer key - the ``BASTION_ADMIN_KEY`` (scope ``admin``) or a live key of
    the operators' tenant from the registry -, else the verified client certificate whose common
    name ``cn`` ``admin_cert_principals`` maps to scopes (principal ``cert:<cn>``). A Bearer key,
    when sent, decides alone. Raises ``Unauthenticated`` (no key, or one that is unknown, revoked
    or expired: the same answer for each) or ``Forbidden`` (a live key of another tenant). One
    digest lookup in SQL; call it off the event loop."""
    token = apikeys.bearer(authorization)
    if token is None:
        mapped = cert_principals(plane.settings.admin_cert_principals).get(cn) if cn else None
        if mapped is not None:
            return {"id": f"cert:{cn}", "tenant": OPERATORS_TENANT, "scopes": mapped}
        raise Unauthenticated("an admin key is required: send 'Authorization: Bearer <key>'")
    oidc.check_length(token)
    configured = plane.settings.admin_key
    if configured is not None and hmac.compare_digest(token.encode(), configured.get_secret_value().encode()):
        return {"id": ENV_ADMIN, "tenant": OPERATORS_TENANT, "scopes": ["admin"]}
    key = plane.registry.key_by_secret(token)
    if key is None:
        raise Unauthenticated("the admin key is unknown, revoked or expired")
    if key["tenant"] != OPERATORS_TENANT:
        raise Forbidden(f"only keys of the '{OPERATORS_TENANT}' tenant may use the admin API")
    return key


async def principal(request: Request) -> dict[str, Any]:
    """The FastAPI dependency: the principal ``AdminGate`` resolved before the body was read
    (resolved here only for an app served without the gate)."""
    found: dict[str, Any] | None = request.scope.get("state", {}).get(STATE_KEY)
    if found is None:
        found = await run_in_threadpool(
            resolve, plane_of(request), request.headers.get("authorization"), client_cn(request.scope)
        )
    return found


def scopes_of(caller: dict[str, Any]) -> frozenset[str]:
    """The scopes a principal holds: all of them for ``admin``."""
    held = frozenset(caller["scopes"])
    return frozenset(SCOPES) if "admin" in held else held


def needs(scope: str, **openapi: Any) -> dict[str, Any]:
    """Route arguments: the caller needs ``scope`` (or ``admin``); the OpenAPI document says so
    in ``x-bastion-scopes`` (the security tests read the route x scope matrix from there)."""

    async def check(caller: dict[str, Any] = Depends(principal)) -> None:  # noqa: B008 - FastAPI dependency
        if scope not in scopes_of(caller):
            raise Forbidden(f"this key lacks the '{scope}' scope (or 'admin') this route needs")

    return {"dependencies": [Depends(check)], "openapi_extra": {**openapi, "x-bastion-scopes": [scope, "admin"]}}


def may_grant(caller: dict[str, Any], scopes: Iterable[str], what: str) -> None:
    """Refuse (403) unless the caller holds every one of ``scopes`` (those of the key it would
    create, rotate or revoke; ``what`` says which)."""
    beyond = sorted(set(scopes) - scopes_of(caller))
    if beyond:
        raise Forbidden(
            f"{what}: the key's scopes {beyond} exceed the caller's {sorted(caller['scopes'])}; only a principal "
            "holding every scope of a key may create, rotate or revoke it ('admin' only by an admin)"
        )
