"""One prediction request as the pipeline sees it, whatever protocol brought it.

The HTTP routes (v1 and OIP v2) and the gRPC service each turn their request into an
``Inbound``: the model named, the headers (or gRPC metadata) the pipeline reads, how to read the
body and how to decode it. ``pipeline.begin`` then runs the same steps for all of them, in the
same order: authenticate, route, read, decode, breaker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from bastion import jsonbody
from bastion.gateway.state import GatewayState

# The request headers (or gRPC metadata keys) the pipeline reads, lower case.
READ_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "idempotency-key",
        "inference-header-content-length",
        "traceparent",
        "x-bastion-subject",
        "x-bastion-timeout-ms",
    }
)
_READ_RAW = frozenset(name.encode() for name in READ_HEADERS)


def _ignore_key(_key_id: str) -> None:
    return None


@dataclass(slots=True)
class Inbound:
    state: GatewayState
    request_id: str
    model: str
    path: str  # what an Idempotency-Key's request is fingerprinted with, with the body
    headers: Mapping[str, str]
    read: Callable[[], Awaitable[bytes]]
    decode: Callable[[bytes, Mapping[str, str]], Any]
    on_key: Callable[[str], None] = field(default=_ignore_key)  # failures from then on count against the key
    version: int | None = None  # a version the caller named (None: routing chooses)


def json_body(body: bytes, headers: Mapping[str, str]) -> Any:
    return jsonbody.parse_json(body, headers.get("content-type"))


def http_headers(scope: Any) -> dict[str, str]:
    """The headers the pipeline reads, in one pass over the raw list (the first of each)."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in _READ_RAW:
            found.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return found


def from_http(request: Request, decode: Callable[[bytes, Mapping[str, str]], Any] = json_body) -> Inbound:
    scope = request.scope

    def on_key(key_id: str) -> None:
        request.state.key_id = key_id  # the abuse guard counts a failure against the key too

    return Inbound(
        state=request.app.state.gateway,
        request_id=scope.get("state", {}).get("request_id", ""),
        model=request.path_params["name"],
        path=scope["path"],
        headers=http_headers(scope),
        read=request.body,
        decode=decode,
        on_key=on_key,
    )
