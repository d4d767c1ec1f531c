"""JSON request bodies, parsed the same way by every HTTP surface (gateway and admin API).

The body must be sent as ``application/json`` (415 otherwise) and be valid JSON (400 otherwise).
Size and nesting limits are enforced before the body gets here (the body-size middleware; orjson
refuses documents nested deeper than 1024 levels). A protocol whose clients send JSON without a
``Content-Type`` (the Open Inference Protocol's) checks the type itself and calls ``loads``.
"""

from __future__ import annotations

from typing import Any

import orjson

from bastion.errors import InvalidInput, UnsupportedMedia


def is_json(content_type: str | None) -> bool:
    """Whether ``content_type`` is ``application/json`` (parameters such as a charset allowed)."""
    return content_type is not None and content_type.split(";", 1)[0].strip().lower() == "application/json"


def parse_json(body: bytes, content_type: str | None) -> Any:
    """The JSON document in ``body``; raise ``UnsupportedMedia`` or ``InvalidInput``."""
    if not is_json(content_type):
        raise UnsupportedMedia("the body must be JSON: send 'Content-Type: application/json'")
    return loads(body)


def loads(body: bytes) -> Any:
    """The JSON document in ``body`` (whatever it was sent as); raise ``InvalidInput``."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the body is not valid JSON: {str(exc).split(':', 1)[0][:120]}") from exc
