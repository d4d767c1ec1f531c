"""``bastion status``: the installation at a glance (``GET /admin/v1/status``), refreshed in place.

A live view by default (every ``--interval`` seconds until Ctrl-C), ``--once`` for one snapshot,
``--json`` for the API's JSON (one snapshot). Gateways, workers, and per model and version:
traffic share, req/s, p50/p99, error rate, queue depth, drift alarm, live accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect

if TYPE_CHECKING:
    from rich.console import Group

    from bastion.adminclient import AdminClient


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy(version: Mapping[str, Any]) -> str:
    found = version.get("live_accuracy")
    if not found or found.get("value") is None:
        return f"- (n={version.get('labels', 0)})"
    low, high = found.get("low"), found.get("high")
    interval = f" [{_pct(low)}, {_pct(high)}]" if low is not None and high is not None else ""
    return f"{_pct(found['value'])}{interval} n={version.get('labels', 0)}"


def _drift(alarm: bool | None) -> Any:
    if alarm is None:
        return "-"
    return output.styled("DRIFT", "bold red") if alarm else "ok"


def render(status: Mapping[str, Any]) -> Group:
    """The status body as rich tables: a summary line, gateways, workers, one table per model."""
    from rich.console import Group
    from rich.text import Text

    workers = status.get("workers", [])
    alive = sum(1 for w in workers if w.get("alive"))
    parts: list[Any] = [
        Text(
            f"Bastion at {status.get('at')} - window {status.get('window_s')} s - "
            f"{len(status.get('gateways', []))} gateway(s), {alive} of {len(workers)} worker(s) alive"
        )
    ]
    parts.append(
        output.table(
            ["gateway", "last reply", "replies buffered", "expires in s"],
            [
                [g["id"], g.get("last_reply_at"), g.get("replies_buffered"), g.get("expires_in_s")]
                for g in status.get("gateways", [])
            ]
            or [["(none)", None, None, None]],
            title="gateways",
        )
    )
    parts.append(
        output.table(
            ["worker", "alive", "idle s", "pending", "models", "warm versions"],
            [
                [w["name"], w.get("alive"), _num(w.get("idle_s")), w.get("pending"), w.get("models"), w.get("warm")]
                for w in workers
            ]
            or [["(none)", None, None, None, None, None]],
            title="workers",
        )
    )
    for model in status.get("models", []):
        depth = model.get("queue_depth", {})
        queued = ", ".join(f"{lane} {n}" for lane, n in depth.items())
        state = "enabled" if model.get("enabled", True) else "DISABLED"
        parts.append(
            output.table(
                [
                    "version",
                    "role",
                    "weight",
                    "traffic",
                    "req/s",
                    "p50 ms",
                    "p99 ms",
                    "errors",
                    "drift",
                    "live accuracy",
                ],
                [
                    [
                        v["version"],
                        v.get("role"),
                        _pct(v.get("weight_share")),
                        _pct(v.get("traffic_share")),
                        _num(v.get("req_per_s"), 2),
                        _num(v.get("p50_ms")),
                        _num(v.get("p99_ms")),
                        _pct(v.get("error_rate")),
                        _drift(v.get("drift_alarm")),
                        _accuracy(v),
                    ]
                    for v in model.get("versions", [])
                ],
                title=f"{model['name']} ({state}; queued: {queued})",
                whole=("version", "role", "drift"),
            )
        )
    return Group(*parts)


def _fetch(client: AdminClient, window: str, model: str | None) -> dict[str, Any]:
    params = {"window": window, **({"model": model} if model else {})}
    found: dict[str, Any] = client._call("GET", "/admin/v1/status", params=params)
    return found


def command(
    once: Annotated[bool, typer.Option("--once", help="print one snapshot and exit")] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=3600, help="seconds between refreshes of the live view")] = (
        2.0
    ),
    window: Annotated[str, typer.Option(help="traffic window: 1m to monitoring_retention_s, e.g. 5m, 1h")] = "5m",
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Gateways, workers and every model's versions: traffic share, req/s, p50/p99, errors, queue,
    drift and live accuracy; a live view until Ctrl-C (--once: one snapshot; --json: the API's JSON)."""
    client = connect(control_url, admin_key, data_dir)
    try:
        first = call(lambda: _fetch(client, window, model))
        if as_json:
            output.print_json(first)
        elif once:
            output.emit(render(first))
        else:
            _watch(first, lambda: call(lambda: _fetch(client, window, model)), interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the live view
    finally:
        client.close()


def _watch(first: dict[str, Any], fetch: Callable[[], dict[str, Any]], interval: float) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a file) print each snapshot after the last."""
    console = output.console()
    if not console.is_terminal:
        current = first
        while True:
            output.emit(render(current))
            output.line("")
            time.sleep(interval)
            current = fetch()
    from rich.live import Live

    with Live(render(first), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(fetch()), refresh=True)
