"""The alerts and the dashboard that ship in deploy/ work against the real thing: promtool accepts
the rules and their unit tests pass (the burn-rate logic), every expression of the rules and the
dashboard names a metric Bastion exports, and a real Prometheus scraping a running ``bastion up``
fires the drift alert within two evaluation intervals of the drift alarm turning on.

Prometheus is Debian's ``prometheus`` package (``scripts/test-debs.sh`` installs it as root,
``./run-tests`` calls it); without it these tests skip, except in CI (``CI=true``), where a missing
Prometheus fails them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import Counter, Gauge, Histogram

from bastion import demo, metrics
from bastion.embedded.redis_server import free_port
from tests.support import breast_cancer, wait_until
from tests.test_up import Up

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
EXAMPLE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "bastion.json"
REQUIRED = os.environ.get("CI") == "true"
EVALUATION_S = 1.0  # the live test's scrape and evaluation interval
BUILTIN = {"up"}  # series Prometheus itself writes for every target

# PromQL words that are not metric names: functions are followed by "(" and dropped anyway
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_KEYWORDS |= {"inf", "nan"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package prometheus; scripts/test-debs.sh installs it as root)"
        if REQUIRED:
            pytest.fail(f"{message}: it is required in CI")
        pytest.skip(message)
    return found


def exported_names() -> set[str]:
    """Every series name Bastion's processes can export: metrics.py's metrics with the suffixes
    the Prometheus client gives each type."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names |= {value._name + "_total"}
        elif isinstance(value, Histogram):
            names |= {value._name + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif isinstance(value, Gauge):
            names.add(value._name)
    return names


def rules() -> list[dict[str, str]]:
    """alerts.yml's rules as ``{"record" or "alert": name, "expr": text}`` (the file's layout: each
    rule starts ``- record:`` or ``- alert:``; its ``expr:`` is one line or a ``|`` block)."""
    found: list[dict[str, str]] = []
    lines = RULES.read_text().splitlines()
    for i, line in enumerate(lines):
        start = re.match(r"\s*- (record|alert): (\S+)", line)
        if start:
            found.append({start.group(1): start.group(2)})
        expr = re.match(r"(\s*)expr: (.*)", line)
        if expr and found:
            text, indent = expr.group(2), len(expr.group(1))
            if text.startswith("|"):
                block = []
                for more in lines[i + 1 :]:
                    if more.strip() and len(more) - len(more.lstrip()) <= indent:
                        break
                    block.append(more.strip())
                text = " ".join(block)
            found[-1]["expr"] = text
    return found


def recorded_names() -> set[str]:
    """The series alerts.yml's recording rules write (the dashboard may read them)."""
    return {rule["record"] for rule in rules() if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers,
    ``by (...)`` lists and range brackets that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = set()
    for match in re.finditer(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        found.add(name)
    return found


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    found = [t["expr"] for p in panels(board["panels"]) for t in p.get("targets", []) if t.get("expr")]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
            assert inner, f"dashboard variable {variable['name']}: {query}"
            found.append(inner.group(1))
    return found


def rule_exprs() -> list[str]:
    return [rule["expr"] for rule in rules()]


def test_every_dashboard_and_alert_expression_names_only_metrics_bastion_exports() -> None:
    known = exported_names() | recorded_names() | BUILTIN
    assert "bastion_drift_alarm" in known and "bastion_gateway_request_seconds_bucket" in known
    assert metric_names('sum by (le) (rate(x_bucket{job="a",le="1.0"}[5m])) / on (a) y > bool 2') == {"x_bucket", "y"}
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    unknown = {(expr, name) for expr in exprs + rule_exprs() for name in metric_names(expr) - known}
    assert not unknown, unknown
    read = {name for expr in exprs for name in metric_names(expr)}
    for wanted in (
        "bastion_gateway_requests_total",
        "bastion_gateway_request_seconds_bucket",
        "bastion_errors_total",
        "bastion_queue_depth",
        "bastion_worker_batch_jobs_bucket",
        "bastion_model_confidence_bucket",
        "bastion_drift_psi",
        "bastion_drift_alarm",
        "bastion_live_accuracy",
    ):
        assert wanted in read, f"the dashboard shows no {wanted}"


def test_the_rules_and_the_example_config_pass_promtool() -> None:
    promtool = _tool("promtool")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(EXAMPLE_CONFIG)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_burn_rate_alerts_fire_and_reset_as_their_unit_tests_say() -> None:
    """alerts.test.yml: a sustained 2% error rate pages; 0.05% does not; a 10-minute outage pages
    during it and stops paging minutes after it (the short window), then opens a ticket; 5% slow
    requests open the latency ticket and no page; the other alerts fire on their conditions."""
    promtool = _tool("promtool")
    done = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


class Prometheus:
    """A real Prometheus server on 127.0.0.1 with alerts.yml, scraping the given targets."""

    def __init__(self, root: Path, targets: dict[str, list[int]]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{EVALUATION_S:g}s", "evaluation_interval": f"{EVALUATION_S:g}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                for job, ports in targets.items()
            ],
        }
        (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(root / "prometheus.log", "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            [
                _tool("prometheus"),
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
        )

    def api(self, path: str, **params: Any) -> Any:
        answer = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, Prometheus, str]]:
    """``bastion up`` (one gateway, one worker; drift judged every second over a one-minute
    window) and a Prometheus scraping all three processes every second."""
    _tool("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    gateway_metrics, worker_metrics, control_port = free_port(), free_port(), free_port()
    env = {
        "BASTION_GATEWAYS": "1",
        "BASTION_WORKERS": "1",
        "BASTION_DRIFT_INTERVAL_S": "1",
        "BASTION_DRIFT_WINDOW_S": "60",
        "BASTION_DRIFT_MIN_ROWS": "50",
    }
    extra = ["--gateway-metrics-port", str(gateway_metrics), "--worker-metrics-port", str(worker_metrics)]
    up = Up(root / "up", free_port(), control_port, env=env, extra=extra)
    prometheus: Prometheus | None = None
    try:
        banner = up.read_banner()
        key = re.search(r"Bearer (bst_\S+?)'", banner)
        assert key, banner
        targets = {
            "bastion-gateway": [gateway_metrics],
            "bastion-worker": [worker_metrics],
            "bastion-control": [control_port],
        }
        prometheus = Prometheus(root, targets)
        wait_until(prometheus.ready, 60, "Prometheus to be ready")

        def all_up() -> bool:
            active = prometheus.api("targets")["activeTargets"] if prometheus else []
            return len(active) == 3 and all(t["health"] == "up" for t in active)

        wait_until(all_up, 60, "Prometheus to scrape gateway, worker and control plane", interval_s=0.2)
        yield up, prometheus, key.group(1)
    finally:
        if prometheus is not None:
            prometheus.stop()
        up.stop()


def _predict(up: Up, key: str, rows: np.ndarray) -> None:
    r = httpx.post(
        f"http://127.0.0.1:{up.gateway_port}/v1/models/{demo.MODEL_NAME}/predict",
        headers={"Authorization": f"Bearer {key}"},
        json={"inputs": rows.tolist()},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def _firing(prometheus: Prometheus, name: str) -> list[dict[str, Any]]:
    return [
        a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == "firing"
    ]


def _epoch(stamp: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, Z) in seconds since the epoch."""
    from datetime import datetime

    head, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float(f"0.{fraction or 0}")


@pytest.mark.timeout(300)
def test_injected_drift_fires_the_drift_alert_within_two_evaluation_intervals(
    live: tuple[Up, Prometheus, str],
) -> None:
    up, prometheus, key = live
    assert not _firing(prometheus, "BastionDriftAlarm")
    features, _ = breast_cancer()
    shifted = features + 3 * features.std(axis=0)  # every feature three standard deviations off
    rng = np.random.default_rng(15)

    def alarmed() -> bool:
        _predict(up, key, shifted[rng.choice(len(shifted), 100)])
        found = prometheus.api("query", query=f'bastion_drift_alarm{{model="{demo.MODEL_NAME}"}} == 1')["result"]
        return bool(found)

    wait_until(alarmed, 120, "Prometheus to scrape bastion_drift_alarm = 1", interval_s=0.5)
    wait_until(lambda: bool(_firing(prometheus, "BastionDriftAlarm")), 10, "the drift alert to fire", interval_s=0.1)
    alert = _firing(prometheus, "BastionDriftAlarm")[0]
    assert alert["labels"]["model"] == demo.MODEL_NAME and alert["labels"]["severity"] == "ticket"
    # The first scraped sample of the alarm at 1, against when the rule first saw it.
    raw = prometheus.api("query", query=f'bastion_drift_alarm{{model="{demo.MODEL_NAME}"}}[5m]')["result"]
    turned_on = min(float(t) for series in raw for t, v in series["values"] if float(v) == 1)
    active_at = _epoch(alert["activeAt"])
    assert turned_on <= active_at + 0.001
    assert active_at - turned_on <= 2 * EVALUATION_S, (turned_on, alert)


def test_every_dashboard_query_runs_on_the_live_prometheus(live: tuple[Up, Prometheus, str]) -> None:
    """Each panel's query, with Grafana's variables filled in, is valid PromQL to a real server;
    the serving panels have data after traffic."""
    up, prometheus, key = live
    features, _ = breast_cancer()
    _predict(up, key, features[:10])
    exprs = [e.replace("$__rate_interval", "1m").replace("$model", demo.MODEL_NAME) for e in dashboard_exprs()]
    for expr in exprs:
        prometheus.api("query", query=expr)

    def scraped() -> bool:
        series = ("bastion_gateway_requests_total", "bastion_worker_jobs_total", "bastion_queue_depth")
        return all(prometheus.api("query", query=name)["result"] for name in series)

    wait_until(scraped, 30, "requests, jobs and queue depth in Prometheus", interval_s=0.2)
