"""Model monitoring end to end, through real processes: predictions through the gateway are counted
by the worker into the version's drift bins (from the reference sample registered with it), the
control plane judges them, and ``GET /admin/v1/models/{name}/monitoring`` and ``bastion models
monitor`` show primary and canary side by side; the drift gauges follow; bad input is a 4xx
problem; callers without ``models:read`` on the admin API are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from bastion import demo
from bastion.adminclient import AdminClient
from bastion.embedded.redis_server import free_port
from tests.support import Stack, breast_cancer, running, wait_until
from tests.test_up import Up

MODEL = demo.MODEL_NAME
ROWS_PER_CALL = 20


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack judging drift every half second; v2 (registered with the demo's reference sample)
    takes most traffic as primary, v1 (no reference) is the canary."""
    with running(
        tmp_path_factory.mktemp("monitoring"),
        workers=1,
        drift_interval_s=0.5,
        monitoring_flush_s=0.2,
        drift_min_rows=100,
        worker_metrics_port=free_port(),
    ) as s:
        s.admin.register(MODEL, demo.model_bytes(), metadata=demo.metadata(), version=2)
        s.admin.deploy(
            MODEL, [{"version": 2, "weight": 80, "role": "primary"}, {"version": 1, "weight": 20, "role": "canary"}]
        )
        yield s


def _predict(stack: Stack, rows: np.ndarray, subjects: range) -> None:
    for subject, start in zip(subjects, range(0, len(rows), ROWS_PER_CALL), strict=False):
        chunk = rows[start : start + ROWS_PER_CALL]
        with stack.client("acme-subjects", headers={"X-Bastion-Subject": f"s{subject}"}) as http:
            answer = http.post(f"/v1/models/{MODEL}/predict", json={"inputs": chunk.tolist()})
            assert answer.status_code == 200, answer.text


def _report(stack: Stack, window: str = "1h") -> dict[str, Any]:
    return stack.admin.monitoring(MODEL, window)


def _version(report: dict[str, Any], number: int) -> dict[str, Any]:
    return next(v for v in report["versions"] if v["version"] == number)


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env = {**clean, "COLUMNS": "250", "BASTION_CONTROL_URL": stack.control_url, "BASTION_ADMIN_KEY": stack.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "bastion", "models", "monitor", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )


def test_reference_traffic_is_counted_per_version_and_judged_without_alarm(watched: Stack) -> None:
    x, _ = breast_cancer()
    _predict(watched, x[:400], range(0, 1000))

    def counted() -> bool:
        report = _report(watched)
        return sum(v["rows"] for v in report["versions"]) >= 400 and all(
            (v["traffic"] or {}).get("rows", 0) == v["rows"] for v in report["versions"]
        )

    wait_until(counted, 30, "the worker's counts of 400 rows")
    report = _report(watched)
    primary, canary = _version(report, 2), _version(report, 1)
    assert primary["roles"] == ["primary"] and canary["roles"] == ["canary"]
    assert primary["reference"] and primary["reference_rows"] == 569 and not canary["reference"]
    assert primary["rows"] + canary["rows"] == 400 and primary["rows"] >= 100
    assert primary["judged"] and not primary["alarm"], primary["drifted"]
    features = {f["feature"]: f for f in primary["features"]}
    assert len(features) == 30 and "mean radius" in features
    radius = features["mean radius"]
    assert radius["rows"] == primary["rows"] and radius["baseline_rows"] == 569
    assert 0 <= radius["psi"] < radius["threshold"] and radius["js"] is not None
    assert canary["features"] == []  # no reference sample: outputs only
    assert {o["feature"] for o in canary["outputs"]} == {"label", "probabilities:confidence"}  # top class
    assert {o["feature"] for o in primary["outputs"]} == {"label", "probabilities"}  # its score output
    assert primary["traffic"]["jobs"] >= 1 and primary["traffic"]["p50_ms"] is not None

    # the worker's model metrics, per (model, version, role): every answered row once
    def scraped() -> dict[str, float]:
        text = httpx.get(f"http://127.0.0.1:{watched.settings.worker_metrics_port}/metrics", timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("bastion_model_") and f'model="{MODEL}"' in line
        }

    v2 = f'model="{MODEL}",role="primary",version="2"'
    wait_until(lambda: scraped().get(f"bastion_model_confidence_count{{{v2}}}") == primary["rows"], 10, "metrics")
    found = scraped()
    labels = sum(v for k, v in found.items() if k.startswith("bastion_model_predictions_total{") and v2 in k)
    assert labels == primary["rows"]
    assert any('label="benign"' in k for k in found)  # class names from the version's signature
    assert found[
        f'bastion_model_output_count{{model="{MODEL}",output="probabilities",role="primary",version="2"}}'
    ] == (2 * primary["rows"])
    assert found[f'bastion_model_confidence_count{{model="{MODEL}",role="canary",version="1"}}'] == canary["rows"]


def test_a_shifted_feature_raises_its_alarm_and_the_gauges_follow(watched: Stack) -> None:
    x, _ = breast_cancer()
    shifted = x[:400].copy()
    shifted[:, 0] += 3 * x[:, 0].std()  # mean radius, three deviations up
    _predict(watched, shifted, range(1000, 2000))

    def alarmed() -> bool:
        return bool(_version(_report(watched), 2)["alarm"])

    wait_until(alarmed, 30, "the drift alarm on v2")
    primary = _version(_report(watched), 2)
    assert primary["drifted"] == ["mean radius"]

    def gauged() -> bool:
        text = httpx.get(f"{watched.control_url}/metrics", timeout=10).text
        return f'bastion_drift_alarm{{model="{MODEL}",version="2"}} 1.0' in text

    wait_until(gauged, 30, "bastion_drift_alarm = 1 for v2")
    text = httpx.get(f"{watched.control_url}/metrics", timeout=10).text
    assert f'bastion_drift_psi{{feature="mean radius",model="{MODEL}",version="2"}}' in text
    assert f'bastion_drift_threshold{{feature="mean radius",model="{MODEL}",version="2"}}' in text

    table = _cli(watched, MODEL, "--window", "1h")
    assert table.returncode == 0, table.stderr
    assert "DRIFT" in table.stdout and "mean radius" in table.stdout and "v2 primary PSI" in table.stdout
    as_json = _cli(watched, MODEL, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert _version(json.loads(as_json.stdout), 2)["drifted"] == ["mean radius"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/admin/v1/models/{MODEL}/monitoring?window=abc", 400),
        (f"/admin/v1/models/{MODEL}/monitoring?window=0m", 400),
        (f"/admin/v1/models/{MODEL}/monitoring?window=400d", 400),
        (f"/admin/v1/models/{MODEL}/monitoring?window=" + "9" * 40, 400),
        ("/admin/v1/models/no-such-model/monitoring", 404),
        ("/admin/v1/models/Bad%20Name/monitoring", 400),
    ],
)
def test_bad_input_to_the_monitoring_route_is_a_4xx_problem(watched: Stack, path: str, status: int) -> None:
    answer = httpx.get(watched.control_url + path, headers={"Authorization": f"Bearer {watched.admin_key}"})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_callers_without_models_read_on_the_admin_api_are_refused(watched: Stack) -> None:
    path = f"{watched.control_url}/admin/v1/models/{MODEL}/monitoring"
    deployer = watched.admin.create_key("operators", "deploy only", scopes=["deploy"])["key"]
    for key, status in ((None, 401), (watched.keys["acme"], 403), (deployer, 403)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answer = httpx.get(path, headers=headers)
        assert answer.status_code == status, answer.text
        assert answer.headers["content-type"].startswith("application/problem+json")
    bad = _cli(watched, "no-such-model")
    assert bad.returncode == 1 and "no model" in bad.stderr


def test_bastion_up_registers_the_demo_with_its_reference_so_drift_works_out_of_the_box(tmp_path: Path) -> None:
    control_port = free_port()
    up = Up(tmp_path / "up", free_port(), control_port, extra=["--workers", "1", "--gateways", "1"])
    try:
        banner = up.read_banner()
        key = banner.split("stored only as a hash):")[1].split()[0]
        x, _ = breast_cancer()
        with httpx.Client(base_url=f"http://127.0.0.1:{up.gateway_port}", timeout=30) as http:
            for start in range(0, 200, 50):
                answer = http.post(
                    f"/v1/models/{MODEL}/predict",
                    json={"inputs": x[start : start + 50].tolist()},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert answer.status_code == 200, answer.text
        admin = AdminClient(f"http://127.0.0.1:{control_port}", (tmp_path / "up" / "admin.key").read_text().strip())
        try:
            wait_until(lambda: _version(admin.monitoring(MODEL, "1h"), 1)["rows"] >= 200, 30, "200 rows counted")
            v1 = _version(admin.monitoring(MODEL, "1h"), 1)
        finally:
            admin.close()
        assert v1["reference"] and v1["reference_rows"] == 569 and v1["judged"] and not v1["alarm"]
        assert [f["feature"] for f in v1["features"]][:2] == ["mean radius", "mean texture"]
    finally:
        up.stop()
