"""Structured JSON logs: structlog with contextvars and a redaction processor.

Logs carry ids and digests, never raw inputs or secrets: the redaction processor drops any
field whose name suggests a secret or a payload.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_REDACTED_KEYS = frozenset(
    {"authorization", "api_key", "key", "token", "password", "secret", "inputs", "body", "payload", "data"}
)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret- or payload-like fields with a marker."""
    for name in list(event):
        if name.lower() in _REDACTED_KEYS:
            event[name] = "[redacted]"
    return event


def configure(level: str = "info", process: str = "bastion") -> None:
    """Configure structlog and the stdlib root logger to emit one JSON object per line."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(process=process)


def get(name: str) -> Any:
    return structlog.get_logger(name)
