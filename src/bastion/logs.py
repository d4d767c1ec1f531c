"""Structured JSON logs: structlog with contextvars and a redaction processor.

Logs carry ids and digests, never raw inputs or secrets. The pipeline, for structlog's own lines
and for the standard library's (uvicorn, asyncio) alike::

    contextvars → request context → level → timestamp → format_exc_info → redact → JSON

Redaction runs after the exception is formatted, so a traceback is scanned like any other text.
It replaces, at any depth of dicts and lists:

- the value of a field whose normalised name contains ``authorization``, ``password``, ``secret``,
  ``token``, ``api_key``, ``apikey``, ``cookie`` or ``credential``, or is a payload name
  (``inputs``, ``outputs``, ``body``, ``payload``, ``data``, ``key``, ...);
- inside any string: a Bastion API key's secret (``bst_<id>_<secret>`` keeps its public id),
  a ``Bearer <token>`` credential and a JWT.

Each request's lines carry its ``request_id`` (bound by ``middleware.RequestId``); code that learns
more about the request (tenant, model, version) adds it with ``bind`` for the rest of the request.
With tracing on, the request's server span binds its ``trace_id`` the same way
(``tracing.enter``), so every line of a traced request names its trace.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"

# The current request's fields: one dict per request, set and reset once (cheaper than a
# contextvar per field); log lines merge it after structlog's own contextvars.
_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("bastion_request", default=None)
RequestToken = contextvars.Token[dict[str, Any] | None]

_SECRET_PARTS = ("authorization", "password", "passwd", "secret", "token", "api_key", "apikey", "cookie", "credential")
_PAYLOAD_NAMES = frozenset(
    {"inputs", "input", "outputs", "output", "instances", "body", "payload", "data", "key", "prompt"}
)
# One scan per string: an API key keeps its public id; a bearer credential (16 characters or more,
# so prose like "a Bearer token" stays; an API key is matched on its own) and a JWT (three
# base64url segments, a JSON header first) go whole.
_SECRET_TEXT = re.compile(
    r"(?P<key>bst_[0-9a-f]{12}_)[A-Za-z0-9_-]+"
    r"|\b(?i:bearer)\s+(?!bst_[0-9a-f]{12}_)[A-Za-z0-9._~+/=-]{16,}"
    r"|eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)
_MAX_DEPTH = 8
_names: dict[str, bool] = {}  # field name → redact its value (bounded below: names are mostly code's)


def _secret_name(name: str) -> bool:
    found = _names.get(name)
    if found is None:
        normal = name.lower().replace("-", "_")
        found = normal in _PAYLOAD_NAMES or any(part in normal for part in _SECRET_PARTS)
        if len(_names) < 4096:
            _names[name] = found
    return found


def _replace(match: re.Match[str]) -> str:
    key = match.group("key")
    if key is not None:
        return key + REDACTED
    if match.group(0)[:1] in "bB":
        return "Bearer " + REDACTED
    return REDACTED


def redact_text(text: str) -> str:
    """``text`` with API key secrets, bearer credentials and JWTs replaced by ``[redacted]``."""
    if "bst_" in text or "eyJ" in text or "earer" in text or "EARER" in text:  # cheap gate for the regex
        return _SECRET_TEXT.sub(_replace, text)
    return text


def _value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        if depth >= _MAX_DEPTH:
            return REDACTED
        return {k: REDACTED if _secret_name(str(k)) else _value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        if depth >= _MAX_DEPTH:
            return REDACTED
        return [_value(v, depth + 1) for v in value]
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace secret- and payload-named fields (at any depth) and secrets inside strings."""
    for name, value in event.items():
        if _secret_name(name):
            event[name] = REDACTED
        elif isinstance(value, str | dict | list | tuple | set | frozenset):
            event[name] = _value(value, 0)
    return event


def bind_request(request_id: str, **fields: Any) -> RequestToken:
    """Start a request's log context: ``request_id`` and ``fields`` join every line written in this
    context (and tasks it starts) until ``clear_request`` is given the returned token."""
    return _request.set({"request_id": request_id, **fields})


def clear_request(token: RequestToken) -> None:
    """End the request's log context started by ``bind_request``."""
    _request.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` (tenant, model, version, ...) to the current request's lines from here on;
    outside a request, to the current context's (structlog's contextvars)."""
    context = _request.get()
    if context is None:
        structlog.contextvars.bind_contextvars(**fields)
    else:
        context.update(fields)


def _merge_request(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    context = _request.get()
    if context:
        for name, value in context.items():
            event.setdefault(name, value)
    return event


class _Ours(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler ``configure`` installs (and replaces when called again)."""


def configure(level: str = "info", process: str = "bastion") -> None:
    """Configure structlog and the stdlib root logger to emit one redacted JSON object per line
    to standard error."""
    out = sys.stderr
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    head: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _merge_request,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Any] = [structlog.processors.format_exc_info, redact, structlog.processors.JSONRenderer()]
    handler = _Ours(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*head, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Ours)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*head, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)


def get(name: str) -> Any:
    return structlog.get_logger(name)
