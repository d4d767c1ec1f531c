"""``bastion deploy ...``: route traffic between versions, roll back, and the kill switch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show, typer_group

app = typer_group("Route traffic between versions, roll back, and the kill switch.")


def route(text: str) -> dict[str, Any]:
    """``VERSION[:WEIGHT[:ROLE]]``, e.g. ``2:10:canary``."""
    parts = text.split(":")
    try:
        found: dict[str, Any] = {"version": int(parts[0])}
        if len(parts) > 1:
            found["weight"] = int(parts[1])
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not VERSION[:WEIGHT[:ROLE]]") from exc
    if len(parts) > 2:
        found["role"] = parts[2]
    return found


def rule(text: str) -> dict[str, Any]:
    """``EU=1,2`` (jurisdiction), ``tenant:acme=2`` or ``without-consent:profiling=1``."""
    when, sep, versions = text.partition("=")
    kind, colon, value = when.partition(":")
    key = {"tenant": "tenant", "without-consent": "without_consent"}.get(kind) if colon else "jurisdiction"
    value = value if colon else when
    try:
        allowed = [int(v) for v in versions.split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not [KIND:]VALUE=V1,V2") from exc
    if not sep or not value or key is None:
        raise typer.BadParameter(f"{text!r} is not JURISDICTION=V1,V2, tenant:NAME=V1 or without-consent:FLAG=V1")
    return {key: value, "allow": allowed}


def _who(rule: Mapping[str, Any]) -> str:
    for key, label in (("jurisdiction", "jurisdiction"), ("tenant", "tenant"), ("without_consent", "without consent")):
        if rule.get(key):
            return f"{label} {rule[key]}"
    return output.cell({k: v for k, v in rule.items() if k != "allow"})


def show_deployment(deployment: Mapping[str, Any]) -> None:
    fields = [(k, v) for k, v in deployment.items() if k not in {"routes", "rules", "disabled"}]
    fields.insert(1, ("enabled", not deployment.get("disabled", False)))
    output.emit(output.record(fields))
    routes = deployment.get("routes") or []
    output.line("")
    output.show_table(
        ["version", "weight", "role"],
        [[r.get("version"), r.get("weight"), r.get("role")] for r in routes],
        title="routes",
        empty="No routes: the model serves nothing (bastion deploy set NAME --route VERSION).",
    )
    rules = deployment.get("rules") or []
    if rules:
        output.line("")
        output.show_table(["callers", "allowed versions"], [[_who(r), r.get("allow")] for r in rules], title="rules")


@app.command("set")
def deploy_set(
    name: str,
    routes: Annotated[
        list[str],
        typer.Option("--route", help="VERSION[:WEIGHT[:ROLE]] (repeatable), e.g. 1:90 2:10:canary"),
    ],
    fallback: Annotated[int | None, typer.Option(help="version that answers while the model is disabled")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            help="policy rule (repeatable): JURISDICTION=V1,V2, tenant:NAME=V1 or without-consent:FLAG=V1; "
            "matching callers reach only these versions"
        ),
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Route NAME's traffic: one primary route, optional weighted canaries (sticky per subject), policy rules."""
    client = connect(control_url, admin_key, data_dir)
    wanted = [route(r) for r in routes]
    rules = [rule(a) for a in allow or []]
    show(call(lambda: client.deploy(name, wanted, fallback, rules)), as_json, show_deployment)


@app.command("show")
def deploy_show(
    name: str,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show NAME's routes, fallback and kill-switch state."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.deployment(name)), as_json, show_deployment)


@app.command("rollback")
def rollback(
    name: str,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """All of NAME's traffic back to its production version (or the one before it)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.rollback(name)), as_json, show_deployment)


@app.command("disable")
def disable(
    name: str,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Kill switch: NAME answers 503 (or its fallback version) on every gateway within a second."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.set_enabled(name, False)), as_json, show_deployment)


@app.command("enable")
def enable(
    name: str,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Serve NAME again after ``deploy disable``."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.set_enabled(name, True)), as_json, show_deployment)
