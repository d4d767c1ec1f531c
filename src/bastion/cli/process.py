"""The process commands: ``bastion up``, ``gateway``, ``worker`` and ``control``.

Each takes one option per setting (``bastion.cli.options``), builds the settings once and calls
the process's ``run``/``serve``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli.options import build_settings, settings_options
from bastion.security import tls
from bastion.settings import Settings

FdOption = Annotated[int | None, typer.Option(metavar="INTEGER", help="serve on this inherited listening socket")]


def checked(options: dict[str, Any], role: tls.Role) -> Settings:
    """The settings; with ``require_tls``, ``error: ...`` naming every plaintext hop and exit 2."""
    settings = build_settings(options)
    try:
        tls.require(settings, role)
    except tls.TLSConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return settings


def up(**options: Any) -> None:
    """Start Bastion on this machine: embedded Redis, SQLite, control plane, gateways, workers."""
    from bastion.embedded import supervisor

    raise typer.Exit(supervisor.run(checked(options, "up")))


def gateway(fd: FdOption = None, **options: Any) -> None:
    """Run one gateway process (public HTTP)."""
    from bastion.gateway import server

    server.serve(checked(options, "gateway"), fd)


def worker(**options: Any) -> None:
    """Run one worker process (no listening socket but an optional metrics port)."""
    from bastion.worker import main as worker_main

    worker_main.run(checked(options, "worker"))


def control(fd: FdOption = None, **options: Any) -> None:
    """Run the control plane (admin API on its own port)."""
    from bastion.control import server

    server.serve(checked(options, "control"), fd)


def register(app: typer.Typer) -> None:
    """Add the process commands to ``app``."""
    for name, command, summary in (
        ("up", up, "Start Bastion on this machine: Redis, SQLite and every process."),
        ("gateway", gateway, None),
        ("worker", worker, "Run one worker process (runs models; no listening socket)."),
        ("control", control, None),
    ):
        app.command(name, short_help=summary)(settings_options()(command))
