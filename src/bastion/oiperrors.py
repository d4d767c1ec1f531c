"""The Open Inference Protocol's error shape: ``{"error": "<message>"}`` as ``application/json``.

Every response under ``/v2`` that is an error takes this shape, whatever produced it (a route, the
body-size limit, the abuse guard), because the protocol's clients (``tritonclient``, KServe's)
read the message from ``error``; everywhere else errors are RFC 9457 problems. The status code
and the headers (``Retry-After``, ``RateLimit``, ``WWW-Authenticate``) are the same either way:
``bastion.problems`` maps an error to them once and picks the shape by path (``covers``).
"""

from __future__ import annotations

import orjson
from starlette.responses import Response

MEDIA_TYPE = "application/json"
PREFIX = "/v2"


def covers(path: str) -> bool:
    """Whether an error for ``path`` is answered in the OIP shape (``/v2`` and below)."""
    return path.startswith(PREFIX) and (len(path) == len(PREFIX) or path[len(PREFIX)] == "/")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type=MEDIA_TYPE, headers=headers)
