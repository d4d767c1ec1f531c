"""``bastion models monitor NAME``: drift per routed version and feature, canary and primary side
by side, with traffic and live quality (``GET /admin/v1/models/{name}/monitoring``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, show


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _drifted(f: Mapping[str, Any]) -> Any:
    if f.get("threshold") is None:
        return "-"
    return output.styled("yes", "bold red") if f.get("drifted") else "no"


def _quality(quality: Mapping[str, Any] | None) -> str:
    if not quality:
        return "no labels"
    accuracy = quality.get("accuracy") or {}
    if accuracy.get("value") is None:
        return f"{quality.get('labels', 0)} labels"
    return (
        f"accuracy {accuracy['value']:.3f} [{accuracy.get('low', 0):.3f}, {accuracy.get('high', 0):.3f}] "
        f"on {quality.get('labels', 0)} labels"
    )


def _traffic(traffic: Mapping[str, Any] | None) -> str:
    if not traffic:
        return "no traffic"
    p50, p99 = traffic.get("p50_ms"), traffic.get("p99_ms")
    return (
        f"{traffic.get('jobs', 0)} jobs, {traffic.get('req_per_s', 0)} req/s, "
        f"p50 {_number(p50, 1)} ms, p99 {_number(p99, 1)} ms, {traffic.get('failed', 0)} failed"
    )


def render(report: Mapping[str, Any]) -> None:
    versions = report.get("versions") or []
    if not versions:
        output.line(f"Model {report.get('model')} routes no version: nothing to monitor.")
        return
    summary = []
    for v in versions:
        alarm = output.styled("DRIFT", "bold red") if v.get("alarm") else ("ok" if v.get("judged") else "not judged")
        summary.append(
            [
                f"v{v.get('version')}",
                ", ".join(v.get("roles") or []),
                v.get("rows", 0),
                v.get("reference_rows", 0) if v.get("reference") else "no reference",
                alarm,
                ", ".join(v.get("drifted") or []) or "-",
                _traffic(v.get("traffic")),
                _quality(v.get("quality")),
            ]
        )
    window = report.get("window_s", 0)
    output.show_table(
        ["version", "roles", "rows", "reference rows", "drift", "drifted", "traffic", "quality"],
        summary,
        title=f"{report.get('model')}: last {window // 60} min, alpha {report.get('alpha')} (Bonferroni)",
        whole=("version",),
    )
    judged = [{f["feature"]: f for f in [*(v.get("features") or []), *(v.get("outputs") or [])]} for v in versions]
    features = [f["feature"] for v in versions for f in v.get("features") or []]
    outputs = [f["feature"] for v in versions for f in v.get("outputs") or []]
    names = list(dict.fromkeys([*features, *outputs]))  # input features first, then outputs
    rows = []
    for name in names:
        row: list[Any] = [name]
        for found in judged:
            f = found.get(name) or {}
            row += [_number(f.get("psi")), _number(f.get("threshold")), _drifted(f), f.get("rows", "-")]
        rows.append(row)
    columns = ["feature"]
    for v in versions:
        tag = f"v{v.get('version')} {'/'.join(v.get('roles') or [])}"
        columns += [f"{tag} PSI", "threshold", "drifted", "n"]
    output.show_table(columns, rows, whole=("feature",))
    output.line(f"threshold: {report.get('threshold')}; outputs are judged against the window before")


def monitor(
    name: str,
    window: Annotated[str, typer.Option(metavar="DURATION", help="window such as 15m, 1h, 1d")] = "1h",
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Drift of model NAME's routed versions (PSI per feature against a threshold calibrated for
    the sample size), canary and primary side by side, with traffic and live accuracy."""
    client = connect(control_url, admin_key, data_dir)
    try:
        report = call(lambda: client.monitoring(name, window))
    finally:
        client.close()
    show(report, as_json, render)
