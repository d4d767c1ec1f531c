"""The ``bastion`` command as people use it, run as a real subprocess against real processes.

Admin commands print tables by default and the API's JSON with ``--json``; ``keys create`` takes
``--expires`` and ``-q``; ``--help`` names every setting whole at 80 columns, with its type, env
var and default; ``doctor`` says what is running and what is not.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bastion import demo
from bastion.embedded.redis_server import free_port
from bastion.queue.consumer import Consumer
from bastion.settings import Settings
from bastion.timefmt import parse_iso
from tests.support import Stack, running, wait_until
from tests.test_up import Up

Run = Callable[..., subprocess.CompletedProcess[str]]


def bastion(*args: str, env: dict[str, str] | None = None, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """``python -m bastion ARGS`` with a terminal ``columns`` wide (rich and click read COLUMNS)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args],
        capture_output=True,
        text=True,
        env={**clean, "COLUMNS": str(columns), **(env or {})},
        timeout=90,
    )


@pytest.fixture(scope="module")
def quiet_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack without workers, so that a job stays queued until a test dead-letters it."""
    with running(tmp_path_factory.mktemp("cli"), workers=0) as s:
        yield s


@pytest.fixture(scope="module")
def cli(quiet_stack: Stack) -> Run:
    env = {"BASTION_CONTROL_URL": quiet_stack.control_url, "BASTION_ADMIN_KEY": quiet_stack.admin_key}

    def run(*args: str, columns: int = 200, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = bastion(*args, env=env, columns=columns)
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    return run


def _header(out: str) -> list[str]:
    return out.splitlines()[0].split()


def _row(out: str, first: str) -> list[str]:
    """The cells of the table row whose first cell is ``first`` (cells are 2+ spaces apart)."""
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{out}")


# tables and --json ---------------------------------------------------------------------------
def test_models_list_is_a_table_with_each_models_versions_and_json_is_the_apis(cli: Run, quiet_stack: Stack) -> None:
    out = cli("models", "list").stdout
    assert _header(out) == ["model", "versions", "current", "routes", "stages", "enabled"]
    assert _row(out, demo.MODEL_NAME) == [demo.MODEL_NAME, "1", "1", "v1 primary 100%", "v1 production", "yes"]
    assert json.loads(cli("models", "list", "--json").stdout) == quiet_stack.admin.models()


def test_keys_list_is_a_table_of_keys_without_secrets_and_json_is_the_apis(cli: Run, quiet_stack: Stack) -> None:
    created = quiet_stack.admin.create_key("listed", "ci runner", ["predict"])
    out = cli("keys", "list", "--tenant", "listed").stdout
    assert _header(out) == ["id", "tenant", "name", "scopes", "tier", "created", "expires", "revoked"]
    row = _row(out, created["id"])
    assert row[1:5] == ["listed", "ci runner", "predict", "standard"] and row[-1] == "no"
    assert "bst_" not in out
    assert json.loads(cli("keys", "list", "--tenant", "listed", "--json").stdout) == quiet_stack.admin.keys("listed")


def test_at_80_columns_a_table_that_does_not_fit_prints_each_row_whole(cli: Run, quiet_stack: Stack) -> None:
    """Ids and times are never folded or cut: rows that cannot sit side by side become blocks."""
    key = quiet_stack.admin.create_key("narrow", "n", ["predict"], expires_at="2031-01-01T00:00:00Z")
    out = cli("keys", "list", "--tenant", "narrow", columns=80).stdout
    lines = out.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80
    assert re.search(rf"^id\s+{key['id']}\s*$", out, re.MULTILINE)
    assert re.search(r"^expires\s+2031-01-01T00:00:00\.000Z\s*$", out, re.MULTILINE)


def test_show_commands_print_field_value_tables(cli: Run, quiet_stack: Stack) -> None:
    shown = cli("models", "show", demo.MODEL_NAME, "1").stdout
    sha = quiet_stack.admin.version(demo.MODEL_NAME, 1)["sha256"]
    assert re.search(rf"^sha256\s+{sha}\s*$", shown, re.MULTILINE)
    assert re.search(r"^inputs\s+input float32 \[\?, 30\]\s*$", shown, re.MULTILINE)
    assert re.search(r"^stage\s+production\s*$", shown, re.MULTILINE)
    deployment = cli("deploy", "show", demo.MODEL_NAME).stdout
    assert re.search(r"^enabled\s+yes\s*$", deployment, re.MULTILINE)
    assert _row(deployment, "1") == ["1", "100", "primary"]
    assert json.loads(cli("deploy", "show", demo.MODEL_NAME, "--json").stdout) == quiet_stack.admin.deployment(
        demo.MODEL_NAME
    )
    history = cli("models", "history", demo.MODEL_NAME, "1").stdout
    assert _header(history) == ["at", "action", "by", "detail"] and "registered" in history


def test_tenants_list_and_set_print_tables(cli: Run, quiet_stack: Stack) -> None:
    out = cli("tenants", "set", "eu-tenant", "--jurisdiction", "EU", "--consent", "profiling").stdout
    assert re.search(r"^jurisdiction\s+EU\s*$", out, re.MULTILINE)
    listed = cli("tenants", "list").stdout
    assert _header(listed) == ["tenant", "jurisdiction", "consents", "limits", "signing", "key"]
    assert _row(listed, "eu-tenant")[:3] == ["eu-tenant", "EU", "profiling"]
    assert json.loads(cli("tenants", "list", "--json").stdout) == quiet_stack.admin.tenants()
    limited = json.loads(
        cli(
            "tenants",
            "set",
            "eu-tenant",
            "--jurisdiction",
            "EU",
            "--units-per-s",
            "50",
            "--max-concurrency",
            "4",
            "--json",
        ).stdout
    )
    assert limited["limits"] == {"units_per_s": 50.0, "max_concurrency": 4}
    untouched = json.loads(cli("tenants", "set", "eu-tenant", "--burst", "80", "--json").stdout)
    assert untouched["jurisdiction"] == "EU", "no --jurisdiction: the tenant's jurisdiction stays"
    assert untouched["consents"] == ["profiling"], "no --consent: the consent flags stay"
    assert untouched["limits"] == {"burst": 80.0, "units_per_s": 0.0, "max_concurrency": 0}
    kept = json.loads(cli("tenants", "set", "eu-tenant", "--consent", "analytics", "--json").stdout)
    assert kept["jurisdiction"] == "EU" and kept["limits"] == untouched["limits"], "no limit flag: limits stay"


def test_dead_letters_are_a_table_of_id_job_reason_and_time(cli: Run, quiet_stack: Stack) -> None:
    assert cli("jobs", "dead-letters", demo.MODEL_NAME).stdout.strip() == "No dead letters."
    with quiet_stack.client() as http:
        job = http.post(f"/v1/models/{demo.MODEL_NAME}/jobs", json={"inputs": [[1.0] * 30]}).json()["id"]
    client = quiet_stack.redis_client()
    try:
        ghost = Consumer(client, "ghost", result_ttl_s=3600, sync_result_ttl_s=60)
        ghost.ensure_groups([demo.MODEL_NAME])
        assert [j.job_id for j in ghost.read([demo.MODEL_NAME], 10, None)] == [job]
        time.sleep(0.01)
        _, dead = ghost.reclaim([demo.MODEL_NAME], min_idle_ms=0, max_deliveries=1)
        ghost.dead_letter(dead, 1)
    finally:
        client.close()
    letters = json.loads(cli("jobs", "dead-letters", demo.MODEL_NAME, "--json").stdout)
    assert letters == quiet_stack.admin.dead_letters(demo.MODEL_NAME) and letters[0]["job_id"] == job
    out = cli("jobs", "dead-letters", demo.MODEL_NAME).stdout
    assert _header(out) == ["id", "job", "version", "reason", "time", "replayable"]
    row = _row(out, letters[0]["id"])
    assert row[1] == job and "delivered 1 times" in out
    replayed = cli("jobs", "replay", demo.MODEL_NAME).stdout
    assert re.search(r"^replayed\s+1\s*$", replayed, re.MULTILINE)


def test_an_api_problem_is_an_error_line_and_exit_1(cli: Run) -> None:
    done = cli("models", "show", "no-such-model", "1", ok=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: 404") and "Traceback" not in done.stderr


# keys create / rotate, models register -------------------------------------------------------
def test_keys_create_expires_in_a_day_and_quiet_prints_only_the_secret(cli: Run, quiet_stack: Stack) -> None:
    done = cli("keys", "create", "--tenant", "expiring", "--expires", "1d", "-q")
    assert re.fullmatch(r"bst_[A-Za-z0-9]+_[A-Za-z0-9_-]+\n", done.stdout), done.stdout
    key_id = done.stdout.split("_")[1]
    (listed,) = [k for k in quiet_stack.admin.keys("expiring") if k["id"] == key_id]
    expires = parse_iso(listed["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=1))) < timedelta(minutes=2)


def test_keys_create_takes_an_iso_time_naive_meaning_utc(cli: Run, quiet_stack: Stack) -> None:
    secret = cli("keys", "create", "--tenant", "iso", "--expires", "2031-06-01T12:00:00", "-q").stdout.strip()
    (listed,) = [k for k in quiet_stack.admin.keys("iso") if k["id"] == secret.split("_")[1]]
    assert parse_iso(listed["expires_at"]) == datetime(2031, 6, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("when", ["tomorrow", "2020-01-01", "0d", "12x", "-3h", "3000000d", "99999999999d", "٣d"])
def test_a_bad_or_past_expiry_is_refused_before_anything_is_created(cli: Run, quiet_stack: Stack, when: str) -> None:
    done = cli("keys", "create", "--tenant", "refused", "--expires", when, "-q", ok=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "--expires" in done.stderr and "Traceback" not in done.stderr
    assert quiet_stack.admin.keys("refused") == []


def test_keys_create_shows_the_secret_once_with_a_table_and_rotate_quiet_prints_the_new_one(
    cli: Run, quiet_stack: Stack
) -> None:
    out = cli("keys", "create", "--tenant", "shown", "--scope", "predict").stdout
    assert "shown once" in out
    (secret,) = re.findall(r"^    (bst_\S+)$", out, re.MULTILINE)
    key_id = secret.split("_")[1]
    assert re.search(rf"^id\s+{key_id}\s*$", out, re.MULTILINE)
    assert re.search(r"^tenant\s+shown\s*$", out, re.MULTILINE)
    rotated = cli("keys", "rotate", key_id, "--overlap", "0", "-q").stdout
    assert re.fullmatch(r"bst_[A-Za-z0-9]+_[A-Za-z0-9_-]+\n", rotated) and rotated.strip() != secret
    ids = {k["id"] for k in quiet_stack.admin.keys("shown")}
    assert rotated.split("_")[1] in ids and key_id in ids


def test_keys_create_json_is_the_apis_answer(cli: Run) -> None:
    created = json.loads(cli("keys", "create", "--tenant", "acme", "--subject-trusted", "--json").stdout)
    assert created["key"].startswith("bst_") and created["subject_trusted"] is True


def test_models_register_quiet_prints_only_the_version(cli: Run, quiet_stack: Stack, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(demo.model_bytes())
    assert cli("models", "register", "cli-model", str(model), "--no-activate", "-q").stdout == "1\n"
    assert cli("models", "register", "cli-model", str(model), "--no-activate", "-q").stdout == "2\n"
    versions = [v["version"] for m in quiet_stack.admin.models() if m["name"] == "cli-model" for v in m["versions"]]
    assert versions == [1, 2]


# --help and settings ---------------------------------------------------------------------------
def test_up_help_names_every_setting_whole_with_its_type_env_var_and_default() -> None:
    done = bastion("up", "--help", columns=80)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    tokens = set(re.findall(r"[A-Za-z0-9_-]+", text))
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in tokens, name
        assert f"BASTION_{name.upper()}" in tokens, name
    assert re.search(r"^  --gateway-port INTEGER ", text, re.MULTILINE)
    assert re.search(r"^  --header-timeout-s FLOAT ", text, re.MULTILINE)
    assert re.search(r"^  --data-dir PATH ", text, re.MULTILINE)
    assert re.search(r"^  --redis-url TEXT ", text, re.MULTILINE)
    assert "--durability [everysec|always|waitaof|replicas]" in text
    assert "--public-metrics / --no-public-metrics" in text
    flat = " ".join(text.split())
    assert "BASTION_GATEWAY_PORT; default: 8000;" in flat
    assert "default: ~/.bastion]" in flat
    assert "BASTION_GATEWAYS; default: one per CPU, 1 to 8;" in flat
    assert "BASTION_DURABILITY; default: everysec]" in flat
    assert "BASTION_ADMIN_KEY; default: unset]" in flat  # a secret's value is never shown
    assert "BASTION_REDIS_URL; default: unset]" in flat
    assert flat.count("; default: ") == len(Settings.model_fields), "every setting shows its default"


def test_every_commands_help_names_its_option_types_as_click_does() -> None:
    import typer

    from bastion.cli import command

    def leaves(cmd: Any, ctx: typer.Context) -> Iterator[tuple[str, str]]:
        for name, sub in getattr(cmd, "commands", {}).items():
            sub_ctx = typer.Context(sub, info_name=name, parent=ctx)
            if getattr(sub, "commands", None):
                yield from leaves(sub, sub_ctx)
            else:
                yield sub_ctx.command_path, sub.get_help(sub_ctx)

    root = command()
    found = dict(leaves(root, typer.Context(root, info_name="bastion")))
    assert {"bastion keys create", "bastion doctor", "bastion jobs dead-letters", "bastion up"} <= set(found)
    for path, text in found.items():
        options = text.split("Options:", 1)[1]
        assert not re.search(r"<(str|int|float|path|bool|file)>", options), (path, options)
    assert re.search(r"^  --count INTEGER ", found["bastion jobs dead-letters"], re.MULTILINE)
    assert re.search(r"^  --expires WHEN ", found["bastion keys create"], re.MULTILINE)


def test_a_setting_not_given_as_a_flag_still_comes_from_its_env_var_and_pydantic_judges_it() -> None:
    from_env = bastion("worker", env={"BASTION_MAX_BATCH": "0"})
    assert from_env.returncode == 2
    assert from_env.stderr.startswith("error: invalid settings: max_batch:")
    flag_wins = bastion("worker", "--max-batch", "0", env={"BASTION_MAX_BATCH": "5"})
    assert flag_wins.returncode == 2 and "error: invalid settings: max_batch:" in flag_wins.stderr
    not_a_number = bastion("worker", "--max-batch", "many")
    assert not_a_number.returncode == 2 and "--max-batch" in not_a_number.stderr


# doctor ------------------------------------------------------------------------------------------
def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[dict[str, str]], str]:
    table = bastion("doctor", *args, env=env, columns=120)
    done = bastion("doctor", *args, "--json", env=env)
    assert table.returncode == done.returncode, table.stdout
    return done.returncode, json.loads(done.stdout), table.stdout


def _status(findings: list[dict[str, str]]) -> dict[str, str]:
    return {f["check"]: f["status"] for f in findings}


def test_doctor_passes_against_a_live_stack_and_never_prints_the_key(quiet_stack: Stack) -> None:
    port = quiet_stack.gateway.rsplit(":", 1)[1]
    args = ("--data-dir", str(quiet_stack.root), "--gateway-port", port)
    args += ("--control-port", str(quiet_stack.settings.control_port))
    code, findings, table = _doctor(*args, env={"BASTION_ADMIN_KEY": quiet_stack.admin_key})
    assert code == 0, table
    status = _status(findings)
    for check in ("redis", "control plane", "admin API, SQL", "gateway"):
        assert status[check] == "ok", table
    assert status["processes"] == "warn"  # started one by one: no processes.json
    models = {f["check"]: f["detail"] for f in findings}["models"]
    assert f"serving: {demo.MODEL_NAME} v1" in models  # (and a warning for a model this module left unrouted)
    assert _header(table) == ["check", "status", "detail"] and _row(table, "gateway")[1] == "ok"
    assert quiet_stack.admin_key not in table and quiet_stack.admin_key.split("_")[2] not in json.dumps(findings)


def test_doctor_against_nothing_running_fails_naming_the_gateway_and_control_plane(tmp_path: Path) -> None:
    gateway, control = free_port(), free_port()
    args = ("--data-dir", str(tmp_path), "--gateway-port", str(gateway), "--control-port", str(control))
    code, findings, table = _doctor(*args)
    assert code == 1
    by_check = {f["check"]: f for f in findings}
    assert by_check["gateway"]["status"] == "FAIL"
    assert f"nothing listens on 127.0.0.1:{gateway}" in by_check["gateway"]["detail"]
    assert "bastion up" in by_check["gateway"]["detail"]
    assert by_check["control plane"]["status"] == "FAIL"
    assert f"127.0.0.1:{control}" in by_check["control plane"]["detail"]
    assert "FAIL" in _row(table, "gateway")


def test_doctor_checks_every_process_of_a_real_bastion_up(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "control", "gateway-metrics", "worker-metrics")}
    flags = ["--gateway-metrics-port", str(ports["gateway-metrics"]), "--worker-metrics-port"]
    flags += [str(ports["worker-metrics"])]
    up = Up(tmp_path, ports["gateway"], ports["control"], extra=["--gateways", "1", "--workers", "1", *flags])
    try:
        up.read_banner()
        args = ("--data-dir", str(tmp_path), "--gateway-port", str(ports["gateway"]))
        args += ("--control-port", str(ports["control"]), *flags)
        seen: list[dict[str, str]] = []

        def worker_loaded() -> bool:
            seen[:] = _doctor(*args)[1]
            return _status(seen).get("worker-0") == "ok"

        wait_until(worker_loaded, 30, "doctor to see the worker's model loaded")
        code, findings, table = _doctor(*args)
        assert code == 0, table
        status = _status(findings)
        assert {k: status[k] for k in ("processes", "redis", "control plane", "gateway", "worker-0", "metrics")} == {
            k: "ok" for k in ("processes", "redis", "control plane", "gateway", "worker-0", "metrics")
        }, table
        details = {f["check"]: f["detail"] for f in findings}
        assert "control, gateway-0, redis, worker-0" in details["processes"]
        assert str(ports["worker-metrics"]) in details["metrics"] and "3 model versions loaded" in details["worker-0"]
        key = (tmp_path / "admin.key").read_text().strip()
        assert key not in table and key not in json.dumps(findings)
    finally:
        assert up.stop() == 0
