"""API-key authentication against the snapshot, and scope checks."""

from __future__ import annotations

import time

from starlette.requests import Request

from bastion.errors import Forbidden, Unauthenticated
from bastion.gateway.state import GatewayState
from bastion.security import apikeys
from bastion.snapshot import KeyInfo


def authenticate(request: Request, state: GatewayState, *scopes: str) -> KeyInfo:
    """The caller's key if it is live and holds one of ``scopes``; else raise 401 / 403."""
    token = apikeys.bearer(request.headers.get("authorization"))
    if token is None:
        raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>'")
    info = state.snapshots.current.keys.get(apikeys.digest(token))
    if info is None or not info.live(time.time()):
        raise Unauthenticated("the API key is unknown, revoked or expired")
    if scopes and info.scopes.isdisjoint(scopes):
        raise Forbidden(f"the API key lacks the scope for this route (needs one of {sorted(scopes)})")
    return info
