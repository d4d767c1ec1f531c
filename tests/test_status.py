"""``bastion status`` and ``GET /admin/v1/status`` after ``bastion up``: the demo model with its
gateways and workers, traffic per version from the predictions sent, JSON for scripts, and a
problem for bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion import demo
from bastion.embedded.redis_server import free_port
from tests.support import default_sigint, wait_until
from tests.test_up import Up

ROW = [1.0] * 30


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # A worker is alive while its idle time is under max(10 s, the visibility timeout).
    env = {"BASTION_GATEWAYS": "2", "BASTION_WORKERS": "1", "BASTION_VISIBILITY_TIMEOUT_S": "2"}
    instance = Up(tmp_path_factory.mktemp("status"), free_port(), free_port(), env=env)
    try:
        instance.read_banner()
        yield instance
    finally:
        instance.stop()


def _cli(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATA_DIR": str(up.data_dir), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "bastion", "status", *args], capture_output=True, text=True, env=env, timeout=60
    )


def _status(up: Up) -> dict[str, Any]:
    done = _cli(up, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def _tabular(status: dict[str, Any]) -> dict[str, Any]:
    """The demo tabular model's entry (bastion up registers the demo text models beside it)."""
    found: dict[str, Any] = next(m for m in status["models"] if m["name"] == demo.MODEL_NAME)
    return found


def _admin(up: Up) -> httpx.Client:
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    key = (up.data_dir / "admin.key").read_text().strip()
    return httpx.Client(base_url=endpoints["control_url"], headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _predict(up: Up, n: int) -> None:
    key = re.search(r"Bearer (bst_\S+?)'", up.out).group(1)  # type: ignore[union-attr]
    with httpx.Client(headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(n):
            r = client.post(
                f"http://127.0.0.1:{up.gateway_port}/v1/models/{demo.MODEL_NAME}/predict", json={"inputs": [ROW]}
            )
            assert r.status_code == 200, r.text


def test_status_once_shows_the_demo_model_its_gateways_and_its_worker(up: Up) -> None:
    done = _cli(up, "--once")
    assert done.returncode == 0, done.stderr
    assert f"{demo.MODEL_NAME} (enabled; queued: sync 0, batch 0, shadow 0)" in done.stdout, done.stdout
    assert "2 gateway(s), 1 of 1 worker(s) alive" in done.stdout, done.stdout
    assert "worker-0" in done.stdout and "primary" in done.stdout
    assert "Traceback" not in done.stderr


def test_status_json_counts_the_predictions_sent_per_version(up: Up) -> None:
    _predict(up, 20)

    def counted() -> bool:
        versions = _tabular(_status(up))["versions"]
        return bool(versions) and versions[0]["jobs"] >= 20

    wait_until(counted, 30, "the status to count 20 jobs", interval_s=0.5)
    status = _status(up)
    assert status["window_s"] == 300
    assert len({g["id"] for g in status["gateways"]}) == 2
    [worker] = status["workers"]
    assert worker["name"] == "worker-0" and worker["alive"] and demo.MODEL_NAME in worker["models"]
    assert f"{demo.MODEL_NAME}:1" in worker["warm"]
    model = _tabular(status)
    assert model["enabled"]
    assert {m["name"] for m in status["models"]} == {demo.MODEL_NAME, "demo-chat", "demo-embed"}  # bastion up's demos
    assert set(model["queue_depth"]) == {"sync", "batch", "shadow"}
    [version] = model["versions"]
    assert (version["version"], version["role"], version["weight_share"], version["traffic_share"]) == (
        1,
        "primary",
        1.0,
        1.0,
    )
    assert version["req_per_s"] > 0 and 0 <= version["p50_ms"] <= version["p99_ms"]
    assert version["error_rate"] == 0
    assert version["drift_alarm"] in (None, False)
    only = _cli(up, "--json", "--model", demo.MODEL_NAME, "--window", "1h")
    assert json.loads(only.stdout)["window_s"] == 3600


@pytest.mark.parametrize("window", ["abc", "5s", "59s", "400d", "1h;x", "", "-1m", "1.5h", "5m\n"])
def test_a_bad_window_is_a_400_problem(up: Up, window: str) -> None:
    with _admin(up) as admin:
        r = admin.get("/admin/v1/status", params={"window": window})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 400 and "window" in r.json()["detail"]


def test_an_unknown_model_is_a_404_problem_and_no_key_a_401(up: Up) -> None:
    with _admin(up) as admin:
        unknown = admin.get("/admin/v1/status", params={"model": "no-such-model"})
        too_long = admin.get("/admin/v1/status", params={"model": "m" * 65})
        anonymous = httpx.get(f"{admin.base_url}/admin/v1/status", timeout=30)
    assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/problem+json")
    assert too_long.status_code == 400 and too_long.headers["content-type"].startswith("application/problem+json")
    assert anonymous.status_code == 401 and anonymous.headers["content-type"].startswith("application/problem+json")
    bad = _cli(up, "--window", "nonsense", "--once")
    assert bad.returncode == 1 and "error: 400" in bad.stderr and "Traceback" not in bad.stderr


def test_the_live_view_refreshes_until_interrupted(up: Up) -> None:
    """Without --once the view redraws every --interval seconds; Ctrl-C ends it with status 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATA_DIR": str(up.data_dir), "COLUMNS": "200"}
    with subprocess.Popen(
        [sys.executable, "-m", "bastion", "status", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,  # Ctrl-C reaches it even under a backgrounded pytest
    ) as view:
        assert view.stdout is not None and view.stderr is not None
        seen = ""
        try:
            while seen.count(demo.MODEL_NAME) < 3:  # the first view and two refreshes
                line = view.stdout.readline()
                assert line, view.stderr.read()
                seen += line
        finally:
            view.send_signal(signal.SIGINT)
            code = view.wait(30)
    assert code == 0


def test_live_accuracy_from_feedback_labels_is_shown_per_version(up: Up) -> None:
    """Ten predictions labelled through the gateway, eight of them with the label the model gave:
    the status shows 80% live accuracy on ten labels for the version, with its interval."""
    with _admin(up) as admin:
        assert admin.put("/admin/v1/tenants/labs", json={"retain_payloads_s": 86_400}).status_code in (200, 201)
        made = admin.post("/admin/v1/keys", json={"tenant": "labs", "name": "t", "scopes": ["predict", "feedback"]})
        assert made.status_code in (200, 201), made.text
    headers = {"Authorization": f"Bearer {made.json()['key']}"}
    base = f"http://127.0.0.1:{up.gateway_port}"
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:

        def predicted() -> httpx.Response:
            return client.post(f"/v1/models/{demo.MODEL_NAME}/predict", json={"inputs": [ROW]})

        wait_until(lambda: predicted().status_code == 200, 20, "the gateway to know the new key")
        answers = [predicted().json() for _ in range(10)]
        for i, answer in enumerate(answers):
            label = answer["outputs"]["label"][0] if i < 8 else 1 - answer["outputs"]["label"][0]

            def recorded(prediction: str = answer["id"], label: int = label) -> bool:
                r = client.post(f"/v1/predictions/{prediction}/feedback", json={"label": label})
                assert r.status_code in (201, 404), r.text  # 404 until the decision log has it
                return r.status_code == 201

            wait_until(recorded, 30, "the label to be recorded", interval_s=0.2)

    def graded() -> bool:
        return bool(_tabular(_status(up))["versions"][0]["labels"] >= 10)

    wait_until(graded, 45, "the status to count ten labels", interval_s=0.5)  # quality: read every 15 s
    version = _tabular(_status(up))["versions"][0]
    accuracy = version["live_accuracy"]
    assert version["labels"] == 10 and accuracy["value"] == 0.8
    assert accuracy["low"] < 0.8 < accuracy["high"]
    assert "80.0% [" in _cli(up, "--once").stdout


def test_a_frozen_worker_is_shown_not_alive(up: Up) -> None:
    """A worker that stops reading (SIGSTOP) is listed as not alive once its idle time passes the
    visibility timeout; it is alive again when it resumes."""
    pid = up.pids()["worker-0"]
    os.killpg(pid, signal.SIGSTOP)  # its own process group: any child it forked too
    try:
        wait_until(lambda: not _status(up)["workers"][0]["alive"], 60, "the frozen worker to be not alive", 1.0)
        assert "0 of 1 worker(s) alive" in _cli(up, "--once").stdout
    finally:
        os.killpg(pid, signal.SIGCONT)
    wait_until(lambda: _status(up)["workers"][0]["alive"], 30, "the worker to be alive again", 0.5)
