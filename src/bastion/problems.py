"""The one place where errors become HTTP: RFC 9457 ``application/problem+json`` responses.

Handlers raise ``BastionError`` subclasses; this module maps each to a status code, headers and a
body that says what was wrong. Unexpected exceptions become a bare 500 with no internal detail.
Under ``/v2`` (the Open Inference Protocol) the body is the protocol's ``{"error": ...}`` instead
(``bastion.oiperrors``): same status, same headers; ``respond`` and ``from_error`` pick the shape
by path, so every error answered for a path takes the shape of that path's protocol.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from bastion import errors, metrics, oiperrors, openaierrors

PROBLEM_TYPE = "application/problem+json"

_STATUS: list[tuple[type[errors.BastionError], int]] = [
    (errors.PayloadTooLarge, 413),
    (errors.HeadersTooLarge, 431),
    (errors.RequestTimeout, 408),
    (errors.UnsupportedMedia, 415),
    (errors.InvalidArtifact, 422),
    (errors.IdempotencyMismatch, 422),
    (errors.InvalidInput, 400),
    (errors.Unauthenticated, 401),
    (errors.Forbidden, 403),
    (errors.NotFound, 404),
    (errors.Conflict, 409),
    (errors.RateLimited, 429),
    (errors.Overloaded, 503),
    (errors.Unavailable, 503),
    (errors.DeadlineExceeded, 504),
    (errors.JobFailed, 502),
    (errors.IntegrityError, 502),
]


def status_of(exc: errors.BastionError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Response:
    slug = title.lower().replace(" ", "-")
    body = {"type": f"https://bastion.dev/problems/{slug}", "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(orjson.dumps(body), status_code=status, media_type=PROBLEM_TYPE, headers=headers)


def respond(
    path: str | None, status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """An error answer for a request to ``path``: the OIP ``{"error": detail}`` under ``/v2``, else
    a problem (``path`` None: a problem). ``extra`` members are a problem's only."""
    if path is not None and oiperrors.covers(path):
        return oiperrors.error(status, detail, headers)
    if path is not None and openaierrors.covers(path):
        return openaierrors.error(status, detail, headers)
    return problem(status, title, detail, headers, instance=path, **extra)


def headers_of(exc: errors.BastionError) -> dict[str, str]:
    """The response headers an error carries, whatever the body's shape."""
    headers: dict[str, str] = {}
    if isinstance(exc, errors.Overloaded | errors.Unavailable | errors.RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, errors.RateLimited):
        headers.update(exc.headers)
    if isinstance(exc, errors.Unauthenticated):
        headers["WWW-Authenticate"] = 'Bearer realm="bastion"'
    return headers


def from_error(exc: errors.BastionError, instance: str | None = None) -> Response:
    """``exc`` answered for a request to ``instance`` (its path; None: unknown, a problem)."""
    public = {k: v for k, v in exc.extra.items() if k in {"job_id", "model", "errors", "gates"}}
    return respond(instance, status_of(exc), exc.title, exc.detail, headers_of(exc), **public)


async def _bastion_handler(request: Request, exc: errors.BastionError) -> Response:
    metrics.ERRORS.labels("http", type(exc).__name__).inc()
    return from_error(exc, request.url.path)


async def _http_handler(request: Request, exc: HTTPException) -> Response:
    titles = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}
    title = titles.get(exc.status_code, "HTTP error")
    detail = exc.detail if isinstance(exc.detail, str) else title
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path}"
    return respond(request.url.path, exc.status_code, title, detail, dict(exc.headers or {}))


async def _validation_handler(request: Request, exc: RequestValidationError) -> Response:
    found = []
    for err in exc.errors()[:20]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        found.append({"location": loc, "message": str(err.get("msg", ""))[:200]})
    summary = "; ".join(f"{e['location']}: {e['message']}" for e in found[:3])
    return respond(request.url.path, 400, "Invalid input", f"the request is invalid: {summary}", errors=found)


EXCEPTION_HANDLERS: dict[Any, Any] = {
    errors.BastionError: _bastion_handler,
    HTTPException: _http_handler,
    RequestValidationError: _validation_handler,
}
