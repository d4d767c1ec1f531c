"""The ``bastion`` command: parse, build settings, call ``run()``.

Process commands (``up``, ``gateway``, ``worker``, ``control``; ``bastion.cli.process``) take one
option per setting, each also readable from ``BASTION_<NAME>``. Admin commands (``models``,
``keys``, ``deploy``, ``tenants``, ``jobs``, ``audit``, ``subjects``) talk to the control plane's
API and print tables, or the API's JSON with ``--json``; ``doctor`` checks a running
installation and ``status`` shows it live. Help is click's plain format, which never truncates
an option's name.
"""

from __future__ import annotations

from typing import Any

import typer

from bastion.cli import audit, certs, deploy, doctor, jobs, keys, models, process, status, subjects, tenants
from bastion.cli.options import plain_metavars

app = typer.Typer(
    help="Bastion: serve ML models to untrusted clients, safely and at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
process.register(app)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(deploy.app, name="deploy")
app.add_typer(tenants.app, name="tenants")
app.add_typer(jobs.app, name="jobs")
app.add_typer(audit.app, name="audit")
app.add_typer(subjects.app, name="subjects")
app.add_typer(certs.app, name="certs")
app.command("doctor", short_help="Check a running installation and say what is wrong.")(doctor.command)
app.command("status", short_help="Gateways, workers and models at a glance, refreshed live.")(status.command)


def command() -> Any:
    """The click command of ``app``, every option's value named as click names it (``INTEGER``...)."""
    found = typer.main.get_command(app)
    plain_metavars(found)
    return found


def main() -> None:
    command()(prog_name="bastion")


__all__ = ["app", "command", "main"]
