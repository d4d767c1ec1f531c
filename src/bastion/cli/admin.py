"""What every admin command shares: where the admin API is, which key to use, how a failure reads.

The control URL, admin key and data directory come from their options or ``BASTION_CONTROL_URL``,
``BASTION_ADMIN_KEY`` and ``BASTION_DATA_DIR``; without a URL, the control host and port of the
settings; without a key, ``<data dir>/admin.key`` (written by ``bastion up``). A problem the API
answers is ``error: <detail>`` on stderr and exit status 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from bastion.cli.options import build_settings

if TYPE_CHECKING:
    from bastion.adminclient import AdminClient

T = TypeVar("T")

ControlUrl = Annotated[
    str | None,
    typer.Option(
        envvar="BASTION_CONTROL_URL", metavar="URL", help="admin API URL (default: from control host and port)"
    ),
]
AdminKey = Annotated[
    str | None,
    typer.Option(envvar="BASTION_ADMIN_KEY", metavar="KEY", help="admin key (default: <data dir>/admin.key)"),
]
DataDir = Annotated[
    Path | None, typer.Option(envvar="BASTION_DATA_DIR", metavar="PATH", help="data directory of bastion up")
]
Json = Annotated[bool, typer.Option("--json", help="print the API's JSON instead of a table")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print only the new secret")]


def control_url_of(control_url: str | None, data_dir: Path | None) -> str:
    """The URL given, else the running instance's (``<data dir>/endpoints.json``) unless
    ``BASTION_CONTROL_HOST``/``_PORT`` say otherwise, else the default host and port."""
    from bastion.embedded import endpoints

    if control_url:
        return control_url.rstrip("/")
    return endpoints.control_url(build_settings({"data_dir": data_dir}))


def admin_key_of(admin_key: str | None, data_dir: Path | None) -> str | None:
    """The key given, else the settings' extra admin key, else ``<data dir>/admin.key``; None: none found."""
    if admin_key:
        return admin_key
    settings = build_settings({"data_dir": data_dir})
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value()
    try:
        return settings.admin_key_file.read_text().strip() or None
    except OSError:
        return None


def connect(control_url: str | None, admin_key: str | None, data_dir: Path | None) -> AdminClient:
    """A client of the admin API, or ``error: no admin key ...`` and exit status 2."""
    from bastion.adminclient import AdminClient

    key = admin_key_of(admin_key, data_dir)
    if key is None:
        where = build_settings({"data_dir": data_dir}).admin_key_file
        typer.echo(f"error: no admin key: set BASTION_ADMIN_KEY or run bastion up once (it writes {where})", err=True)
        raise typer.Exit(2)
    from bastion.embedded import endpoints

    verify = endpoints.client_verify(build_settings({"data_dir": data_dir}))
    return AdminClient(control_url_of(control_url, data_dir), key, verify=verify)


def call(fn: Callable[[], T]) -> T:
    """``fn()``; a problem the admin API answered is ``error: <detail>`` on stderr, exit status 1."""
    from bastion.adminclient import AdminError

    try:
        return fn()
    except AdminError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from exc


def show(result: T, as_json: bool, render: Callable[[T], None]) -> None:
    """The API's JSON unchanged (``--json``), or ``render(result)``: tables."""
    from bastion.cli import output

    if as_json:
        output.print_json(result)
    else:
        render(result)


def json_file(path: Path) -> Any:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path} is not a readable JSON file") from exc


def typer_group(help_text: str) -> typer.Typer:
    """A command group with click's plain help (never truncated at 80 columns)."""
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None)


__all__ = ["AdminKey", "ControlUrl", "DataDir", "Json", "Quiet", "call", "connect", "json_file", "show", "typer_group"]
