"""``bastion up``: one command starts everything, prints a working key, supervises, stops cleanly."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.embedded.redis_server import free_port
from tests.support import Up, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); treat it as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    instance = Up(tmp_path_factory.mktemp("up"), free_port(), free_port())
    try:
        instance.read_banner()
        yield instance
    finally:
        instance.stop()


def _curl_from_banner(banner: str) -> list[str]:
    start = banner.index("curl -s")
    command = banner[start:].split("\n\n")[0].replace("\\\n", " ")
    return shlex.split(command)


def test_the_printed_curl_returns_a_prediction(up: Up) -> None:
    args = _curl_from_banner(up.out)
    assert args[0] == "curl"
    url = args[2]
    headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
    body = args[args.index("-d") + 1]
    r = httpx.post(url, headers=headers, content=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"]["label"] == [0]
    assert re.search(r"bst_[A-Za-z0-9]+_[A-Za-z0-9_-]+", up.out)


def test_the_banner_prints_a_ready_openai_sdk_line_for_the_demo_chat_model(up: Up) -> None:
    code = next(line.strip() for line in up.out.splitlines() if "from openai import OpenAI" in line)
    compile(code, "<banner>", "exec")  # valid Python as printed
    key = re.search(r"bst_[A-Za-z0-9]+_[A-Za-z0-9_-]+", up.out)
    assert key is not None
    assert f'OpenAI(base_url="http://127.0.0.1:{up.gateway_port}/v1", api_key="{key.group(0)}")' in code
    assert 'model="demo-chat"' in code
    probe = httpx.post(
        f"http://127.0.0.1:{up.gateway_port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key.group(0)}"},
        json={"model": "demo-chat", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    if probe.status_code == 404 and "demo-chat" not in probe.text:
        pytest.skip("this gateway has no OpenAI chat route yet")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Bastion" in done.stdout  # the demo model's one sentence


def test_processes_are_sized_to_the_machine_and_the_banner_says_so(up: Up) -> None:
    cpus = len(os.sched_getaffinity(0))
    gateways, workers = min(8, cpus), max(1, min(8, cpus // 4))
    names = set(up.pids())
    assert {f"gateway-{i}" for i in range(gateways)} <= names and f"gateway-{gateways}" not in names
    assert {f"worker-{i}" for i in range(workers)} <= names and f"worker-{workers}" not in names
    assert f"Processes for {cpus} CPUs: {gateways} gateway" in up.out
    assert "one per CPU, 1 to 8" in up.out and "one per 4 CPUs, 1 to 8" in up.out
    assert "models list" in up.out  # the next command to try


def test_the_cli_finds_the_running_instance_from_its_data_directory_alone(up: Up) -> None:
    """Started on other ports than the defaults: admin commands and doctor need only the data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env |= {"BASTION_DATA_DIR": str(up.data_dir), "COLUMNS": "200"}
    endpoints = json.loads((up.data_dir / "endpoints.json").read_text())
    assert endpoints["gateway_url"] == f"http://127.0.0.1:{up.gateway_port}"
    assert "admin" not in json.dumps(endpoints).lower(), "no key in the file"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bastion", *args], capture_output=True, text=True, env=env)

    listed = cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == ["breast-cancer", "demo-chat", "demo-embed"]
    guards = cli("models", "guards", "demo-chat", "--json")
    assert guards.returncode == 0, guards.stderr
    policy = json.loads(guards.stdout)["guards"]
    assert (policy["injection"], policy["canary"], policy["pii_out"]) == ("block", "block", "redact")
    doctor = cli("doctor", "--json")
    findings = json.loads(doctor.stdout)
    assert doctor.returncode == 0, findings
    assert {f["check"] for f in findings if f["status"] == "FAIL"} == set()
    gateway = next(f for f in findings if f["check"] == "gateway")
    assert gateway["status"] == "ok" and str(up.gateway_port) in gateway["detail"], gateway


def test_a_taken_gateway_port_is_reported_clearly(up: Up, tmp_path: Path) -> None:
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "bastion",
            "up",
            "--data-dir",
            str(tmp_path),
            "--gateway-port",
            str(up.gateway_port),
            "--control-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert f"port {up.gateway_port}" in second.stderr and "--gateway-port" in second.stderr
    assert "Traceback" not in second.stderr


def test_a_crashed_worker_is_restarted(up: Up) -> None:
    before = up.pids()["worker-0"]
    os.kill(before, signal.SIGKILL)
    wait_until(lambda: up.pids().get("worker-0", before) != before, 30, "the worker to be restarted")
    key = re.search(r"Bearer (bst_\S+?)'", up.out).group(1)  # type: ignore[union-attr]
    r = httpx.post(
        f"http://127.0.0.1:{up.gateway_port}/v1/models/breast-cancer/predict",
        headers={"Authorization": f"Bearer {key}"},
        json={"inputs": [[1.0] * 30]},
        timeout=30,
    )
    assert r.status_code == 200


def test_a_refused_second_start_leaves_the_running_instances_processes_file(up: Up) -> None:
    """A second ``bastion up`` on the same data directory is refused and removes nothing of the first."""
    before = (up.data_dir / "processes.json").read_text()
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "bastion",
            "up",
            "--data-dir",
            str(up.data_dir),
            "--gateway-port",
            str(free_port()),
            "--control-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2 and "another bastion up is running" in second.stderr
    assert (up.data_dir / "processes.json").read_text() == before
    assert all(_alive(pid) for pid in up.pids().values())


def test_ctrl_c_stops_every_process(up: Up) -> None:
    pids = up.pids()
    assert up.stop() == 0
    wait_until(lambda: not any(_alive(p) for p in pids.values()), 10, "all processes to exit")
    assert not (up.data_dir / "processes.json").exists()


def test_a_second_start_reuses_the_data_and_does_not_print_a_new_key(up: Up) -> None:
    """Restarted on the same data directory: no new key; the admin key reaches only the control plane."""
    admin_key = "test-admin-key-" + "x" * 32
    again = Up(up.data_dir, free_port(), free_port(), env={"BASTION_ADMIN_KEY": admin_key})
    try:
        banner = again.read_banner()
        assert "bst_" not in banner
        assert "bastion keys create" in banner
        pids = again.pids()
        assert admin_key.encode() in _environ(pids["control"])
        for role in ("gateway-0", "worker-0"):
            assert admin_key.encode() not in _environ(pids[role]), role
            assert b"BASTION_DATABASE_URL" not in _environ(pids[role]), role
        third = subprocess.run(
            [
                sys.executable,
                "-m",
                "bastion",
                "up",
                "--data-dir",
                str(up.data_dir),
                "--gateway-port",
                str(free_port()),
                "--control-port",
                str(free_port()),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert third.returncode == 2
        assert "another bastion up is running" in third.stderr
    finally:
        assert again.stop() == 0


def test_sighup_stops_every_process(tmp_path: Path) -> None:
    """Closing the terminal (SIGHUP) stops the children too; none is left holding the port."""
    instance = Up(tmp_path, free_port(), free_port())
    try:
        instance.read_banner()
        pids = instance.pids()
        instance.proc.send_signal(signal.SIGHUP)
        assert instance.proc.wait(60) == 0
        wait_until(lambda: not any(_alive(p) for p in pids.values()), 10, "all processes to exit")
    finally:
        instance.stop()


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp writes them) with a socket listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


LOOPBACK, ANY = "0100007F", "00000000"


def test_a_public_host_leaves_the_admin_api_and_metrics_on_the_control_host(tmp_path: Path) -> None:
    """``--host 0.0.0.0`` opens the gateway to the network; the admin API and the metrics ports
    stay on ``--control-host`` (127.0.0.1); a metrics port already taken is reported and left
    off, and the start goes on."""
    gateway_port, control_port, worker_metrics = free_port(), free_port(), free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    gateway_metrics = taken.getsockname()[1]
    extra = ["--host", "0.0.0.0", "--control-host", "127.0.0.1"]  # noqa: S104 - the point of the test
    extra += ["--worker-metrics-port", str(worker_metrics), "--gateway-metrics-port", str(gateway_metrics)]
    instance = Up(tmp_path, gateway_port, control_port, extra=extra)
    try:
        banner = instance.read_banner()
        assert _listening(control_port) == {LOOPBACK}
        assert _listening(gateway_port) == {ANY}
        wait_until(lambda: _listening(worker_metrics) == {LOOPBACK}, 30, "the worker's metrics port")
        assert "bastion_worker" in httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics", timeout=10).text
        assert f"Admin API: http://127.0.0.1:{control_port}" in banner
        assert f"Gateway (public): http://0.0.0.0:{gateway_port}" in banner
        assert f"worker-0 {worker_metrics}" in banner and "(off, port taken: gateway-0)" in banner
        pids = instance.pids()
        assert b"BASTION_GATEWAY_METRICS_PORT=0\x00" in _environ(pids["gateway-0"])
        assert f"BASTION_WORKER_METRICS_PORT={worker_metrics}\x00".encode() in _environ(pids["worker-0"])
    finally:
        instance.proc.send_signal(signal.SIGINT)
        instance.proc.wait(60)
        errors = instance.proc.stderr.read() if instance.proc.stderr else ""
        assert instance.stop() == 0
        taken.close()
    assert "metrics_port_in_use" in errors and "--gateway-metrics-port" in errors and str(gateway_metrics) in errors


def test_explicit_process_counts_win_over_the_machine_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion import settings as settings_module

    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 16)
    sized = settings_module.Settings()
    assert (sized.gateways, sized.workers) == (8, 4) and not {"gateways", "workers"} & sized.model_fields_set
    monkeypatch.setattr(settings_module, "usable_cpus", lambda: 1)
    assert (settings_module.Settings().gateways, settings_module.Settings().workers) == (1, 1)
    monkeypatch.setenv("BASTION_GATEWAYS", "3")
    given = settings_module.Settings(workers=5)
    assert (given.gateways, given.workers) == (3, 5) and {"gateways", "workers"} <= given.model_fields_set


def test_a_cgroup_cpu_quota_bounds_the_machine_sizing(tmp_path: Path) -> None:
    from bastion.settings import cgroup_cpu_quota

    assert cgroup_cpu_quota(tmp_path) is None, "no cgroup files: no quota"
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None, "v2 'max': no quota"
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2, "1.5 CPUs of quota round up to 2"
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 4, "cgroup v1"
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None, "v1 -1: no quota"
