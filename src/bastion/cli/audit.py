"""``bastion audit ...``: the decision log - show, search, verify, export, prove.

``verify --offline DIR`` checks an export with files alone: it imports ``bastion.audit.export``
(and what that needs: the tree, the signatures, the one verifier) and nothing that talks to Redis,
SQL or the control plane. A log that does not verify exits with status 3 (an API problem: 1; a
usage error: 2), so a script or an auditor can tell a broken log from an unreachable one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show, typer_group

if TYPE_CHECKING:
    from bastion.adminclient import AdminClient
    from bastion.audit.signing import Checkpoint

app = typer_group("The decision log: show, search, verify, export and prove events.")

KINDS = ("decision", "admin", "erasure")
NOT_VERIFIED = 3  # the exit status of a log (or an export) that does not verify
_AGO = re.compile(r"\s*([0-9]{1,9})\s*([dhms])\s*")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_WHEN_HELP = "ISO 8601 (2030-01-01, 2030-01-01T12:00:00Z; no zone: UTC) or a duration ago (7d, 12h, 30m, 45s)"


def moment(text: str | None, now: datetime | None = None) -> str | None:
    """``WHEN`` as the API's ISO 8601 UTC time: ISO 8601 as given, or a duration before now."""
    from bastion.timefmt import iso_utc, parse_iso

    if text is None:
        return None
    found = _AGO.fullmatch(text)
    try:
        if found:
            when = (now or datetime.now(UTC)) - timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})
        else:
            when = parse_iso(text)
    except (ValueError, OverflowError) as exc:
        raise typer.BadParameter(f"{text[:64]!r} is neither {_WHEN_HELP}") from exc
    return iso_utc(when)


def _kind_option(value: str | None) -> str | None:
    if value is not None and value not in KINDS:
        raise typer.BadParameter(f"{value[:32]!r} is not one of {', '.join(KINDS)}")
    return value


def _when_option(value: str | None) -> str | None:
    return moment(value)


When = Annotated[str | None, typer.Option(metavar="WHEN", callback=_when_option, help=_WHEN_HELP)]


# views -----------------------------------------------------------------------------------
def _summary(leaf: Mapping[str, Any]) -> str:
    """What an event is about, in a few words."""
    kind = leaf.get("kind")
    if kind == "decision":
        cached = " (cache)" if leaf.get("cache") else ""
        return f"{leaf.get('model')} v{leaf.get('version')} {leaf.get('role')}{cached}"
    if kind == "erasure":
        return f"erased {leaf.get('keys_destroyed', 0)} keys"
    resource = leaf.get("resource") or {}
    return f"{leaf.get('action')} {resource.get('kind')}/{resource.get('name')}"


def show_events(page: Mapping[str, Any]) -> None:
    events = page.get("events") or []
    output.show_table(
        ["position", "id", "kind", "at", "tenant", "what", "by"],
        [
            [
                e.get("position"),
                (leaf := e.get("event") or {}).get("id"),
                leaf.get("kind"),
                leaf.get("at"),
                leaf.get("tenant"),
                _summary(leaf),
                leaf.get("key") or leaf.get("principal"),
            ]
            for e in events
        ],
        empty="No events.",
        whole=("position", "id", "at"),
    )
    if page.get("next_after") is not None:
        output.line(f"More: --after {page['next_after']}")


def show_event(event: Mapping[str, Any]) -> None:
    leaf = event.get("event") or {}
    output.show_record({"position": event.get("position"), "leaf_hash": event.get("leaf_hash"), **leaf})
    payload = event.get("payload") or {}
    output.line("")
    output.line(f"payload: {payload.get('state', 'none')}")
    for part in ("inputs", "outputs"):
        if part in payload:
            output.show_record(payload[part], title=part)


def show_report(report: Mapping[str, Any]) -> None:
    fields = ("size", "first_position", "checkpoints_checked", "last_verified_size", "unverified_tail")
    if report.get("ok"):
        output.line("OK: the log verifies against its signed checkpoints.")
    else:
        first = (report.get("findings") or [{}])[0]
        where = (
            first.get("position") if first.get("position") is not None else f"checkpoint {first.get('checkpoint_size')}"
        )
        output.line(f"FAILED: the first position that does not match: {where}")
    output.show_record({k: report.get(k) for k in fields})
    findings = report.get("findings") or []
    if findings:
        output.show_table(
            ["position", "checkpoint", "what"],
            [[f.get("position"), f.get("checkpoint_size"), f.get("what")] for f in findings],
            whole=("position", "checkpoint"),
        )


def _verdict(report: Mapping[str, Any], as_json: bool) -> None:
    show(report, as_json, show_report)
    if not report.get("ok"):
        raise typer.Exit(NOT_VERIFIED)


# commands --------------------------------------------------------------------------------
@app.command("show")
def show_command(
    event_id: str,
    tenant: Annotated[str | None, typer.Option(help="only an event of this tenant")] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show event EVENT_ID (a prediction or job id, or admin-N): the logged document and, for a
    decision, its payload, decrypted when it was kept and not erased."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.audit_event(event_id, tenant)), as_json, show_event)


@app.command("search")
def search(
    tenant: Annotated[
        str | None, typer.Option(help="only this tenant's events (needed with --subject, --model)")
    ] = None,
    subject: Annotated[str | None, typer.Option(help="only decisions about this subject (by its pseudonym)")] = None,
    model: Annotated[str | None, typer.Option(help="only decisions of this model")] = None,
    version: Annotated[int | None, typer.Option(metavar="INTEGER", min=1, help="only this version of --model")] = None,
    since: When = None,
    until: When = None,
    kind: Annotated[
        str | None,
        typer.Option(metavar="[decision|admin|erasure]", callback=_kind_option, help="only events of this kind"),
    ] = None,
    limit: Annotated[int, typer.Option(metavar="INTEGER", min=1, max=1000, help="events per page")] = 100,
    after: Annotated[
        int | None, typer.Option(metavar="INTEGER", min=0, help="the page after this position (a page's 'More')")
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Search the log, a page at a time, oldest first (--since and --until: --until is exclusive)."""
    client = connect(control_url, admin_key, data_dir)
    filters = {"tenant": tenant, "subject": subject, "model": model, "version": version, "kind": kind}
    page = call(lambda: client.audit_search(**filters, since=since, until=until, after=after, limit=limit))
    show(page, as_json, show_events)


@app.command("verify")
def verify(
    start: Annotated[int, typer.Option("--from", metavar="INTEGER", min=0, help="the first position")] = 0,
    end: Annotated[
        int | None, typer.Option("--to", metavar="INTEGER", min=0, help="the position to stop before; default: the end")
    ] = None,
    offline: Annotated[
        Path | None,
        typer.Option(
            exists=True, file_okay=False, help="verify an export directory (bastion audit export) with files alone"
        ),
    ] = None,
    public_keys: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="with --offline: trust only these keys (a public-keys.json, or the JSON of bastion audit keys)",
        ),
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Recompute the tree against the signed checkpoints and name the first position that does
    not match; exit status 3 when it does not verify."""
    if offline is not None:
        if start or end is not None:
            raise typer.BadParameter("--offline verifies the whole export; --from and --to are for the live log")
        _verdict(_verify_offline(offline, public_keys), as_json)
        return
    if public_keys is not None:
        raise typer.BadParameter("--public-keys goes with --offline")
    client = connect(control_url, admin_key, data_dir)
    _verdict(call(lambda: client.audit_verify(start, end)), as_json)


def _verify_offline(directory: Path, public_keys: Path | None) -> dict[str, Any]:
    from bastion.audit import export
    from bastion.errors import InvalidInput

    try:
        trusted = _read_keys(public_keys) if public_keys is not None else None
        return export.verify_offline(directory, trusted).to_dict()
    except InvalidInput as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(NOT_VERIFIED) from exc


def _read_keys(path: Path) -> dict[str, bytes]:
    """Key id -> raw public key, from ``{"keys": [{"key_id", "public_key": hex}]}``."""
    import json

    from bastion.audit.signing import key_id

    try:
        listed = json.loads(path.read_text())["keys"]
        found = {str(k["key_id"]): bytes.fromhex(k["public_key"]) for k in listed}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise typer.BadParameter(f'{path} is not a JSON file of {{"keys": [{{"key_id", "public_key"}}]}}') from exc
    wrong = sorted(kid for kid, raw in found.items() if key_id(raw) != kid)
    if wrong:
        raise typer.BadParameter(f"{path}: key ids {wrong} do not name their public keys")
    return found


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(file_okay=False, help="the directory to write (new, or empty)")],
    since: When = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Export the log from its first event at or after --since (default: from the start) up to
    the latest signed checkpoint: events, checkpoints and public keys as files that
    bastion audit verify --offline checks without Redis, SQL or the control plane."""
    from bastion.audit import export
    from bastion.errors import BastionError

    client = connect(control_url, admin_key, data_dir)
    start, end = call(lambda: _range(client, since))
    checkpoints = call(lambda: list(_checkpoints(client, start, end)))
    keys = call(client.audit_keys)["keys"]
    first = call(lambda: client.audit_leaves(start, 1))
    try:
        manifest = export.write_export(
            out,
            _leaves(client, start, end),
            checkpoints,
            {str(k["key_id"]): bytes.fromhex(k["public_key"]) for k in keys},
            start,
            [bytes.fromhex(n) for n in first["frontier"]],
        )
    except BastionError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from exc
    show(manifest, as_json, lambda m: output.show_record(m, title=f"exported to {out}"))


def _range(client: AdminClient, since: str | None) -> tuple[int, int]:
    """[start, end): from the first event at or after ``since``, to the latest checkpoint's size."""
    from bastion.adminclient import AdminError

    try:
        end = int(client.audit_checkpoint()["size"])
    except AdminError as exc:
        if not str(exc.detail).startswith("404"):
            raise
        end = 0  # nothing signed yet: an empty export
    if since is None:
        return 0, end
    found = client.audit_search(since=since, limit=1)["events"]
    start = int(found[0]["position"]) if found else end
    return min(start, end), end


def _checkpoints(client: AdminClient, start: int, end: int) -> Iterator[Checkpoint]:
    """The signed checkpoints of a size in [start, end]."""
    from bastion.audit.signing import Checkpoint

    after = max(start - 1, 0)
    while True:
        page = client.audit_checkpoints(after)
        for found in page["checkpoints"]:
            if found["size"] > end:
                return
            yield Checkpoint.from_dict(found)
        if page["next_after"] is None:
            return
        after = page["next_after"]


def _leaves(client: AdminClient, start: int, end: int) -> Iterator[tuple[int, bytes, bytes]]:
    """Leaves [start, end) as (position, canonical body, leaf hash), a page at a time."""
    import base64

    at = start
    while at < end:
        page = client.audit_leaves(at, min(1000, end - at))
        for leaf in page["leaves"]:
            if leaf["position"] >= end:
                return
            yield int(leaf["position"]), base64.b64decode(leaf["body"]), bytes.fromhex(leaf["leaf_hash"])
        if page["next_start"] is None:
            return
        at = int(page["next_start"])


@app.command("proof")
def proof(
    event_id: str,
    size: Annotated[
        int | None, typer.Option(metavar="INTEGER", min=1, help="the tree's size; default: the latest checkpoint's")
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """The inclusion proof of event EVENT_ID against the latest signed checkpoint, checked here
    too (the proof against the root, the checkpoint's signature); exit status 3 when it fails."""
    client = connect(control_url, admin_key, data_dir)
    found = call(lambda: client.audit_proof(event_id, size))
    found["verified_here"] = proof_holds(found)
    show(found, as_json, _show_proof)
    if not found["verified_here"]:
        raise typer.Exit(NOT_VERIFIED)


def proof_holds(found: Mapping[str, Any]) -> bool:
    """Whether the proof leads from the leaf hash to the root, and the checkpoint (when given)
    is of that root and size and is signed by the key it names."""
    from bastion.audit import merkle
    from bastion.audit.signing import Checkpoint, key_id

    root = bytes.fromhex(found["root"])
    path = [bytes.fromhex(h) for h in found["proof"]]
    if not merkle.verify_inclusion(bytes.fromhex(found["leaf_hash"]), found["position"], found["size"], path, root):
        return False
    signed = found.get("checkpoint")
    if not signed:
        return True
    checkpoint = Checkpoint.from_dict(signed)
    public = bytes.fromhex(signed.get("public_key") or "")
    return (
        checkpoint.size == found["size"]
        and checkpoint.root == root
        and key_id(public) == checkpoint.key_id
        and checkpoint.verifies(public)
    )


def _show_proof(found: Mapping[str, Any]) -> None:
    signed = found.get("checkpoint") or {}
    output.show_record(
        {
            "position": found.get("position"),
            "size": found.get("size"),
            "leaf_hash": found.get("leaf_hash"),
            "root": found.get("root"),
            "proof": "\n".join(found.get("proof") or []),
            "checkpoint": f"size {signed.get('size')} at {signed.get('at')} by key {signed.get('key_id')}"
            if signed
            else None,
            "verified here": found.get("verified_here"),
        }
    )


@app.command("keys")
def keys(
    as_json: Json = False, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """The public keys that verify the log's checkpoints: publish them for auditors
    (bastion audit verify --offline DIR --public-keys FILE pins them)."""
    client = connect(control_url, admin_key, data_dir)
    found = call(client.audit_keys)
    show(
        found,
        as_json,
        lambda k: output.show_table(
            ["key id", "current", "public key"],
            [[x["key_id"], x["key_id"] == k.get("current"), x["public_key"]] for x in k.get("keys") or []],
            empty="No keys.",
            whole=("key id", "public key"),
        ),
    )
