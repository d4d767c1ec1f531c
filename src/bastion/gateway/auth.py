"""Caller identity at the gateway: API keys (against the snapshot) or OIDC JWTs, and scope checks.

A bearer token that starts with ``bst_`` is an API key; anything else is a JWT when an OIDC
issuer is configured. A JWT's tenant (its ``oidc_tenant_claim``) must be a tenant operators
registered: its jurisdiction, consent flags and budget come from there, never from the token.
The operators' tenant (``OPERATORS_TENANT``, the admin API's) is not a serving tenant: a token
naming it is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from starlette.requests import Request

from bastion.constants import API_KEY_PREFIX, OPERATORS_TENANT, SCOPES
from bastion.errors import Forbidden, RateLimited, Unauthenticated
from bastion.gateway.state import GatewayState
from bastion.security import apikeys, oidc
from bastion.snapshot import KeyInfo, Limits, Snapshot

# Which scopes each kind of gateway route accepts (any one of them). The OpenAPI document
# carries the same lists as ``x-bastion-scopes``; the security suite checks every pair.
PREDICT = ("predict",)
JOBS = ("jobs",)
READ_MODELS = ("models:read", "predict")


def declares(scopes: tuple[str, ...]) -> dict[str, list[str]]:
    return {"x-bastion-scopes": list(scopes)}


async def authenticate(request: Request, state: GatewayState, *scopes: str) -> KeyInfo:
    """The HTTP caller if its credential is live and holds one of ``scopes``; else raise 401 / 403."""

    def on_key(key_id: str) -> None:
        request.state.key_id = key_id  # failures from here on also count against the key

    return await authenticate_header(request.headers.get("authorization"), state, scopes, on_key)


async def authenticate_header(
    authorization: str | None, state: GatewayState, scopes: tuple[str, ...], on_key: Callable[[str], None]
) -> KeyInfo:
    """The caller of an ``Authorization`` header (or gRPC ``authorization`` metadata) if its
    credential is live and holds one of ``scopes``; else raise 401 / 403. ``on_key`` hears the
    key's id once it is known, so that failures from then on count against the key."""
    token = apikeys.bearer(authorization)
    if token is None:
        raise Unauthenticated("an API key or token is required: send 'Authorization: Bearer <key>'")
    oidc.check_length(token)
    if token.startswith(API_KEY_PREFIX) or state.jwks is None:
        info = state.snapshots.current.keys.get(apikeys.digest(token))
        if info is None or not info.live(time.time()):
            raise Unauthenticated("the API key is unknown, revoked or expired")
    else:
        info = caller_of(await oidc.verify(token, state.jwks), state.snapshots.current, state)
    on_key(info.id)
    if state.abuse is not None and (left := state.abuse.banned_for("k:" + info.id)):
        raise RateLimited(f"this key is blocked for {int(left) + 1} s after repeated failed requests", int(left) + 1)
    if scopes and info.scopes.isdisjoint(scopes):
        raise Forbidden(f"the credential lacks the scope for this route (needs one of {sorted(scopes)})")
    return info


def caller_of(claims: dict[str, object], snapshot: Snapshot, state: GatewayState) -> KeyInfo:
    settings = state.settings
    tenant = claims.get(settings.oidc_tenant_claim)
    if tenant == OPERATORS_TENANT:
        raise Forbidden(
            f"the token's '{settings.oidc_tenant_claim}' claim names '{OPERATORS_TENANT}': operators are not a "
            "serving tenant"
        )
    if not isinstance(tenant, str) or tenant not in snapshot.tenants:
        raise Forbidden(f"the token's '{settings.oidc_tenant_claim}' claim names no registered tenant")
    raw = claims.get(settings.oidc_scopes_claim)
    granted = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
    scopes = frozenset(s for s in granted if isinstance(s, str) and s in SCOPES and s != "admin")
    attributes = snapshot.tenants[tenant]
    subject = f"{claims.get('iss')}\x00{claims.get('sub')}".encode()
    exp = claims.get("exp")
    return KeyInfo(
        id="jwt-" + hashlib.blake2b(subject, digest_size=8).hexdigest(),
        tenant=tenant,
        scopes=scopes,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        jurisdiction=attributes.jurisdiction,
        consents=attributes.consents,
        limits=attributes.limits if attributes.limits else Limits(),
        retain_payloads=attributes.retain_payloads,
        data_subject=_claim(claims, settings.oidc_subject_claim),
    )


def _claim(claims: dict[str, object], name: str | None) -> str:
    """The configured subject claim's value when it is a usable string (1 to 256 characters)."""
    value = claims.get(name) if name else None
    return value if isinstance(value, str) and 0 < len(value) <= 256 else ""
