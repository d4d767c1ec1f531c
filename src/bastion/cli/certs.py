"""``bastion certs ...``: a development CA and one certificate per role, and their rotation.

``init`` writes ``ca.pem``/``ca-key.pem`` and ``<role>.pem``/``<role>-key.pem`` for every role
(gateway, worker, control, redis, postgres, admin) into ``--dir``; ``rotate`` reissues the role
certificates under the same CA. Processes read them from ``BASTION_TLS_CERT``/``_KEY``/``_CA`` and
take a new certificate on SIGHUP (docs/deploy.md, "Rotating certificates").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bastion.cli import output
from bastion.cli.admin import Json, typer_group

app = typer_group("A development CA and one certificate per role, and their rotation.")

Dir = Annotated[Path, typer.Option("--dir", metavar="PATH", help="directory of the CA and certificates")]
Hosts = Annotated[
    list[str] | None,
    typer.Option("--host", metavar="NAME", help="an extra DNS name or IP address in every certificate (repeat)"),
]
Days = Annotated[int, typer.Option(min=1, max=825, metavar="DAYS", help="lifetime of each role certificate, days")]


def _show(issued: list[object], as_json: bool) -> None:
    from bastion.security.certs import Issued

    rows = [i for i in issued if isinstance(i, Issued)]
    if as_json:
        output.print_json(
            [
                {
                    "role": i.role,
                    "cert": str(i.cert),
                    "key": str(i.key),
                    "not_after": i.not_after.isoformat(),
                    "sans": list(i.sans),
                }
                for i in rows
            ]
        )
        return
    output.show_table(
        ["role", "certificate", "key", "expires", "names"],
        [[i.role, str(i.cert), str(i.key), i.not_after.isoformat(timespec="seconds"), ", ".join(i.sans)] for i in rows],
        whole=("role",),
    )


@app.command("init")
def init(
    directory: Dir = Path("certs"),
    host: Hosts = None,
    days: Days = 30,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing CA (every old certificate stops verifying)")
    ] = False,
    as_json: Json = False,
) -> None:
    """Create a CA (365 days) and a certificate per role (EC P-256, server and client use; SANs:
    the role, localhost, 127.0.0.1 and every --host)."""
    from bastion.security import certs

    try:
        issued = certs.init(directory, tuple(host or ()), days, force=force)
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _show(list(issued), as_json)


@app.command("rotate")
def rotate(directory: Dir = Path("certs"), host: Hosts = None, days: Days = 30, as_json: Json = False) -> None:
    """Reissue every role certificate under the existing CA (new keys); then send SIGHUP to the
    gateways and control plane (they reload without dropping a request) and restart workers."""
    from bastion.security import certs

    try:
        issued = certs.rotate(directory, tuple(host or ()), days)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _show(list(issued), as_json)
