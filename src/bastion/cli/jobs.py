"""``bastion jobs ...``: dead-lettered jobs, listed (never their inputs) and replayed."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show, typer_group

app = typer_group("Dead-lettered jobs: list and replay.")


def _when(letter: dict[str, Any]) -> Any:
    return letter.get("dead_lettered_at") or letter.get("created_at")


def show_dead_letters(letters: list[dict[str, Any]]) -> None:
    output.show_table(
        ["id", "job", "version", "reason", "time", "replayable"],
        [
            [d.get("id"), d.get("job_id"), d.get("version"), d.get("reason"), _when(d), d.get("replayable")]
            for d in letters
        ],
        empty="No dead letters.",
        whole=("id", "job", "time"),
    )


@app.command("dead-letters")
def dead_letters(
    name: str,
    count: Annotated[int, typer.Option(min=1, max=10_000, metavar="INTEGER", help="the newest this many")] = 100,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """List NAME's newest dead-lettered jobs (never their inputs)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.dead_letters(name, count)), as_json, show_dead_letters)


@app.command("replay")
def replay(
    name: str,
    entry: Annotated[list[str] | None, typer.Option("--id", help="dead-letter id (repeatable); default: all")] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Queue NAME's dead-lettered async jobs again."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.replay(name, entry)), as_json, output.show_record)
