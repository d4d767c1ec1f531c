"""Times as clients and operators see them: ISO 8601 in UTC, to the millisecond, with a ``Z``.

Every time in an API response, an event and the CLI's output goes through ``iso_utc``
(``2026-12-02T06:27:56.123Z``); every time a client sends is read by ``parse_iso``. Inside, times
stay what suits each store (epoch milliseconds in Redis, ``DateTime`` columns in SQL).

A time without a zone is UTC: SQLite hands ``DateTime(timezone=True)`` columns back naive, and a
client that writes ``2030-01-01T00:00:00`` means UTC too.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(value: datetime | float | int | None) -> str | None:
    """``value`` as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (milliseconds truncated, never rounded up), or None.

    A number is seconds since the Unix epoch; a naive datetime is UTC; an aware one is converted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a time is a datetime or epoch seconds, not a bool")
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    elif not isinstance(value, datetime):
        raise TypeError(f"a time is a datetime or epoch seconds, not {type(value).__name__}")
    elif value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    else:
        value = value.astimezone(UTC)
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def parse_iso(text: str) -> datetime:
    """An aware UTC datetime from an ISO 8601 date or date-time (``Z`` or an offset; none: UTC).

    Raises ``ValueError`` for anything else, naming the expected form."""
    if not isinstance(text, str):
        raise ValueError(f"expected an ISO 8601 time as a string, got {type(text).__name__}")
    cleaned = text.strip()
    if cleaned[-1:] in ("Z", "z"):
        cleaned = cleaned[:-1] + "+00:00"
    try:
        found = datetime.fromisoformat(cleaned)
        return found.replace(tzinfo=UTC) if found.tzinfo is None else found.astimezone(UTC)
    except (ValueError, OverflowError):  # (OverflowError: an offset past year 1 or 9999)
        raise ValueError(
            f"{text[:64]!r} is not an ISO 8601 time; expected e.g. 2030-01-01T00:00:00Z or 2030-01-01"
        ) from None


def to_millisecond(value: datetime) -> datetime:
    """``value`` (naive: UTC) as aware UTC, truncated to the millisecond ``iso_utc`` shows."""
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.replace(microsecond=aware.microsecond - aware.microsecond % 1000)
