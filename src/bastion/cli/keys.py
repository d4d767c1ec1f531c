"""``bastion keys ...``: create, list, rotate and revoke API keys.

A new secret is printed once, prominently, and never again (the control plane keeps only its
hash); ``-q`` prints only the secret, for ``KEY=$(bastion keys create --tenant demo -q)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, Quiet, call, connect, show, typer_group

app = typer_group("Create, list, rotate and revoke API keys.")

_DURATION = re.compile(r"\s*([0-9]{1,9})\s*([dhms])\s*")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def expiry(text: str, now: datetime | None = None) -> datetime:
    """``WHEN`` as an aware UTC time: ISO 8601 (a date, or a date and time; no zone: UTC) or a
    duration from now (``90d``, ``12h``, ``30m``, ``45s``). A time not in the future, or text of
    neither form, is a ``typer.BadParameter``."""
    from bastion.timefmt import parse_iso

    now = now or datetime.now(UTC)
    found = _DURATION.fullmatch(text)
    try:
        if found:
            when = now + timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
        else:
            when = parse_iso(text)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(
            f"{text[:64]!r} is neither an ISO 8601 time (2030-01-01, 2030-01-01T12:00:00Z; no zone: UTC) "
            "nor a duration (90d, 12h, 30m, 45s) that ends before the year 10000"
        ) from exc
    if when <= now:
        raise typer.BadParameter(f"{text[:64]!r} is not in the future (now is {now.isoformat(timespec='seconds')})")
    return when


def _expires_option(value: str | None) -> str | None:
    from bastion.timefmt import iso_utc

    return None if value is None else iso_utc(expiry(value))


# views -----------------------------------------------------------------------------------
_LIST_COLUMNS = ["id", "tenant", "name", "scopes", "tier", "created_at", "expires_at", "revoked"]


def _revoked(key: Mapping[str, Any]) -> Any:
    return key.get("revoked_at") or key.get("revoked")


def show_keys(keys: list[dict[str, Any]]) -> None:
    output.show_table(
        ["id", "tenant", "name", "scopes", "tier", "created", "expires", "revoked"],
        [[k.get(c) if c != "revoked" else _revoked(k) for c in _LIST_COLUMNS] for k in keys],
        empty="No keys.",
        whole=("id", "created", "expires"),
    )


def _public(key: Mapping[str, Any]) -> dict[str, Any]:
    """The key's fields without its secret."""
    return {k: v for k, v in key.items() if k not in {"key", "secret"}}


def show_secret(secret: str) -> None:
    output.line("New API key (shown once; stored only as a hash, so it cannot be shown again):")
    output.line("")
    output.line(f"    {secret}")
    output.line("")


def show_created(created: Mapping[str, Any]) -> None:
    show_secret(str(created["key"]))
    output.show_record(_public(created))


def show_rotated(rotated: Mapping[str, Any]) -> None:
    show_secret(str(rotated["secret"]))
    output.show_record(_public(rotated.get("key") or {}), title="new key")
    old = rotated.get("rotated") or {}
    output.line("")
    output.line(f"The old key {old.get('id')} keeps working until {old.get('expires_at')}.")


# commands --------------------------------------------------------------------------------
@app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to (created if new)")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
    scope: Annotated[
        list[str] | None, typer.Option(help="scope (repeatable); default predict, jobs, models:read")
    ] = None,
    tier: Annotated[str | None, typer.Option(help="rate tier (BASTION_RATE_TIERS); default: default_tier")] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN",
            callback=_expires_option,
            help="when the key stops working: ISO 8601 (2030-01-01, 2030-01-01T12:00:00Z; no zone: UTC) "
            "or a duration from now (90d, 12h, 30m, 45s); default: never",
        ),
    ] = None,
    subject_trusted: Annotated[
        bool, typer.Option(help="the key may name the subject of a request (X-Bastion-Subject): trusted back ends")
    ] = False,
    quiet: Quiet = False,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash. Its scopes must be ones
    the calling key holds."""
    client = connect(control_url, admin_key, data_dir)
    created = call(lambda: client.create_key(tenant, name, scope, tier, subject_trusted, expires))
    if quiet:
        output.line(str(created["key"]))
    else:
        show(created, as_json, show_created)


@app.command("list")
def list_keys(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """List keys (never their secrets)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.keys(tenant)), as_json, show_keys)


@app.command("rotate")
def rotate(
    key_id: str,
    overlap: Annotated[int, typer.Option(help="seconds the old secret keeps working")] = 3600,
    quiet: Quiet = False,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Issue a new secret for KEY_ID (same tenant, scopes, tier); the old one expires after --overlap."""
    client = connect(control_url, admin_key, data_dir)
    rotated = call(lambda: client.rotate_key(key_id, overlap))
    if quiet:
        output.line(str(rotated["secret"]))
    else:
        show(rotated, as_json, show_rotated)


@app.command("revoke")
def revoke(
    key_id: str,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Revoke key KEY_ID; gateways refuse it once they see the new snapshot (well under a second)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.revoke_key(key_id)), as_json, output.show_record)
