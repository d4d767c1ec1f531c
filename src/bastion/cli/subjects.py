"""``bastion subjects ...``: data-subject rights - erase a subject, export every decision about it.

SUBJECT is the id the tenant's back end named (``X-Bastion-Subject``), or ``-`` to read it from
standard input (so it stays out of the shell's history and the process list). It travels in the
request body only, never in a URL.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show, typer_group

app = typer_group("Data-subject rights: erase a subject, export every decision about it.")

Tenant = Annotated[str, typer.Option(help="the subject's tenant")]


def subject_of(text: str) -> str:
    """SUBJECT as given, or its first line read from standard input for ``-``."""
    if text != "-":
        return text
    found = sys.stdin.readline().rstrip("\r\n")
    if not found:
        raise typer.BadParameter("SUBJECT '-' reads the subject from standard input, which gave none")
    return found


@app.command("erase")
def erase(
    subject: str,
    tenant: Tenant,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Erase SUBJECT of --tenant: destroy its data keys (its kept payloads become unreadable;
    the log still verifies), record an erasure event, remove what Redis holds for it and rewrite
    Redis's files without it. Waits for Redis (allow minutes on a large Redis)."""
    client = connect(control_url, admin_key, data_dir)
    named = subject_of(subject)
    show(call(lambda: client.erase_subject(tenant, named)), as_json, output.show_record)


@app.command("export")
def export(
    subject: str,
    tenant: Tenant,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Every decision about SUBJECT of --tenant, with its payload decrypted where still kept, as
    JSON (an access report; recorded in the log as subject.export)."""
    client = connect(control_url, admin_key, data_dir)
    named = subject_of(subject)
    output.print_json(call(lambda: client.export_subject(tenant, named)))
