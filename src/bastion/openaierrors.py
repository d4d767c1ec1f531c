"""The OpenAI API's error shape: ``{"error": {"message", "type", "param", "code"}}`` as JSON.

Every error answered on an OpenAI-compatible route (``/v1/models``, ``/v1/models/{id}``,
``/v1/embeddings``, ``/v1/chat/completions``, ``/v1/completions``) takes this shape, because the
``openai`` SDK and the tools built on it read the message from ``error.message`` and raise their
own exception type by status. The status code and the headers (``Retry-After``, ``RateLimit``,
``WWW-Authenticate``) are those ``bastion.problems`` gives the same error anywhere else.

``type`` follows the status as OpenAI's does; ``code`` is the error's own (``extra["code"]``: a
guard's name such as ``injection``, ``context_length_exceeded``) or else the status's; ``param``
names the request field at fault when one is (``extra["param"]``).

A leaf: it imports nothing of the gateway, so ``bastion.problems`` may pick this shape by path
(``covers``) the way it picks the Open Inference Protocol's.
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

MEDIA_TYPE = "application/json"
EXACT_PATHS = frozenset({"/v1/models", "/v1/embeddings", "/v1/chat/completions", "/v1/completions"})
_MODEL_PREFIX = "/v1/models/"

# status -> (type, code) when the error names no code of its own
_BY_STATUS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "idempotency_key_reused"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "headers_too_large"),
    500: ("server_error", None),
    502: ("server_error", "model_error"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


def covers(path: str) -> bool:
    """Whether an error for ``path`` is answered in the OpenAI shape: the OpenAI routes, and
    ``/v1/models/{id}`` (one segment; ``/v1/models/{name}/predict`` is Bastion's own v1 API)."""
    if path in EXACT_PATHS:
        return True
    return path.startswith(_MODEL_PREFIX) and "/" not in path[len(_MODEL_PREFIX) :] and len(path) > len(_MODEL_PREFIX)


def kind_of(status: int) -> tuple[str, str | None]:
    """The OpenAI ``type`` and default ``code`` of an HTTP status."""
    found = _BY_STATUS.get(status)
    if found is not None:
        return found
    return ("invalid_request_error", None) if status < 500 else ("server_error", None)


def body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, object]:
    kind, default_code = kind_of(status)
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    return Response(
        orjson.dumps(body(status, message, param=param, code=code)),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )
