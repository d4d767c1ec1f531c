"""``bastion tenants ...``: tenants' jurisdiction, consent flags, limits, signing key and payload retention."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show, typer_group

app = typer_group("Tenant attributes (jurisdiction, consent flags, limits, signing key, payload retention).")

_DURATION = re.compile(r"\s*([0-9]{1,9})\s*([dhs])\s*")
_SECONDS = {"d": 86_400, "h": 3600, "s": 1}


def retention(text: str | None) -> int | None:
    """``--retain-payloads`` in seconds: ``none`` (or 0) is 0, not kept; ``30d``, ``12h``, ``3600s``."""
    if text is None:
        return None
    if text.strip().lower() in ("none", "0"):
        return 0
    found = _DURATION.fullmatch(text)
    if found is None:
        raise typer.BadParameter(f"{text[:64]!r} is neither 'none' nor a duration such as 30d, 12h or 3600s")
    return int(found.group(1)) * _SECONDS[found.group(2)]


def _fields(tenant: Mapping[str, Any]) -> dict[str, Any]:
    """The tenant's fields, its signing key shown as whether it has one (the key itself is long)."""
    return {k: (bool(v) if k == "signing_key" else v) for k, v in tenant.items()}


def show_tenants(tenants: list[dict[str, Any]]) -> None:
    output.show_table(
        ["tenant", "jurisdiction", "consents", "limits", "signing key"],
        [
            [t.get("name"), t.get("jurisdiction"), t.get("consents"), t.get("limits"), bool(t.get("signing_key"))]
            for t in tenants
        ],
        empty="No tenants.",
        whole=("tenant",),
    )


@app.command("set")
def tenants_set(
    name: str,
    jurisdiction: Annotated[str | None, typer.Option(help="e.g. EU; matched by deployment policy rules")] = None,
    signing_key: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, readable=True, help="file with the tenant's Ed25519 public key (PEM or base64)"
        ),
    ] = None,
    consent: Annotated[list[str] | None, typer.Option(help="consent flag the tenant holds (repeatable)")] = None,
    units_per_s: Annotated[
        float | None, typer.Option(help="limits: compute units per second per model (0: no rate limit)")
    ] = None,
    burst: Annotated[float | None, typer.Option(help="limits: bucket size in compute units; unset: unlimited")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="limits: jobs in flight at once; 0: no cap")] = None,
    tokens_per_min: Annotated[
        int | None,
        typer.Option(min=0, help="limits: text tokens (prompt + max_tokens) per minute per model; unset: unlimited"),
    ] = None,
    tokens_burst: Annotated[
        int | None, typer.Option(min=1, help="limits: text token bucket size; unset: --tokens-per-min")
    ] = None,
    requests_per_min: Annotated[
        int | None, typer.Option(min=0, help="limits: text requests per minute per model; unset: unlimited")
    ] = None,
    requests_burst: Annotated[
        int | None, typer.Option(min=1, help="limits: text request bucket size; unset: --requests-per-min")
    ] = None,
    retain_payloads: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION|none",
            help="how long the decision log keeps the tenant's inputs and outputs, encrypted per subject (30d, 12h, "
            "3600s), or none; needs the audit scope; default for a new tenant: none",
        ),
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Create or update tenant NAME. The limits are set together: one left out goes back to its
    default (no limit); with none of them given the tenant's limits stay as they are. Other
    options left out keep their values."""
    retain = retention(retain_payloads)
    client = connect(control_url, admin_key, data_dir)
    key = signing_key.read_text() if signing_key else None
    given = {
        "units_per_s": units_per_s,
        "burst": burst,
        "max_concurrency": max_concurrency,
        "tokens_per_min": tokens_per_min,
        "tokens_burst": tokens_burst,
        "requests_per_min": requests_per_min,
        "requests_burst": requests_burst,
    }
    limits = {k: v for k, v in given.items() if v is not None} or None
    result = call(lambda: client.set_tenant(name, jurisdiction, key, consent, limits, retain))
    show(result, as_json, lambda t: output.show_record(_fields(t)))


@app.command("list")
def tenants_list(
    as_json: Json = False, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """List tenants and their attributes."""
    client = connect(control_url, admin_key, data_dir)
    show(call(client.tenants), as_json, show_tenants)
