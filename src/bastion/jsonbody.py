"""JSON request bodies, parsed the same way by every HTTP surface (gateway and admin API).

The body must be sent as ``application/json`` (415 otherwise) and be valid JSON (400 otherwise).
Size and nesting limits are enforced before the body gets here (the body-size middleware; orjson
refuses documents nested deeper than 1024 levels).
"""

from __future__ import annotations

from typing import Any

import orjson

from bastion.errors import InvalidInput, UnsupportedMedia


def parse_json(body: bytes, content_type: str | None) -> Any:
    """The JSON document in ``body``; raise ``UnsupportedMedia`` or ``InvalidInput``."""
    if content_type is None or content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMedia("the body must be JSON: send 'Content-Type: application/json'")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {str(exc).split(':', 1)[0][:120]}") from exc
