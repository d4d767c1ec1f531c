"""``bastion doctor``: check a running installation and say what is wrong and what to do.

Checks, in order: the processes ``bastion up`` recorded in ``<data dir>/processes.json`` are
alive; the embedded Redis answers ``PING`` on its unix socket (a ``-NOAUTH`` reply counts: the
server answers, and doctor needs no password), or the Redis of ``BASTION_REDIS_URL`` does, or,
when neither can be reached directly, the control plane's ``/readyz`` says it reaches Redis; the
control plane's ``/readyz``; the admin API reads SQL (a models list, with the admin key); the
gateway's ``/readyz`` on ``host:gateway_port``; models with a primary route; each worker's loaded
model versions (``bastion_worker_models_loaded`` on its metrics port); the metrics ports.

Every result is ``ok``, ``warn`` (not checked, or worth a look) or ``FAIL``; the exit status is 1
when any check fails. No key or password is ever printed.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from bastion.cli import output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, admin_key_of
from bastion.cli.options import build_settings, settings_options
from bastion.settings import Settings

if TYPE_CHECKING:
    import httpx

Status = Literal["ok", "warn", "FAIL"]
_STYLES = {"ok": "green", "warn": "yellow", "FAIL": "bold red"}
_START = "start it with bastion up (./run-bastion in a checkout)"
_LOADED = re.compile(r"^bastion_worker_models_loaded(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.MULTILINE)
# The settings doctor takes as options: where bastion up listens.
DOCTOR_FIELDS = (
    "host",
    "gateway_port",
    "control_host",
    "control_port",
    "gateway_metrics_port",
    "worker_metrics_port",
    "redis_url",
)


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def ping_unix(path: Path, timeout_s: float = 2.0) -> str | None:
    """None when a Redis answers on the unix socket ``path`` (``+PONG``, or ``-NOAUTH``: it wants a
    password, so it is up), else what went wrong."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            reply = sock.recv(256)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if reply.startswith((b"+PONG", b"-NOAUTH")):
        return None
    return f"unexpected reply {reply[:40]!r}"


def _address(url: str) -> str:
    import httpx

    parsed = httpx.URL(url)
    return f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


class Doctor:
    """The checks against one installation (settings as bastion up had them, where it listens)."""

    def __init__(self, settings: Settings, control_url: str, admin_key: str | None, timeout_s: float = 3.0) -> None:
        from bastion.embedded import endpoints

        self.settings = settings
        self.control_url = control_url.rstrip("/")
        self.admin_key = admin_key
        self.timeout_s = timeout_s
        self.gateway_url = endpoints.gateway_url(settings)
        self.metrics_host = endpoints.client_host(settings.control_host)
        given = {"gateway_metrics_port", "worker_metrics_port", "control_host"} & settings.model_fields_set
        running = None if given else endpoints.Endpoints.read(settings.data_dir)
        self.known_metrics = running.metrics if running is not None else {}
        self.logs = settings.data_dir / "logs"
        self.verify = endpoints.client_verify(settings)
        self.metrics_scheme = "https" if self.control_url.startswith("https:") else "http"
        self.findings: list[Finding] = []

    def _add(self, check: str, status: Status, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    def _get(self, url: str) -> httpx.Response | None:
        import httpx

        try:
            return httpx.get(url, timeout=self.timeout_s, verify=self.verify)
        except httpx.HTTPError:
            return None

    def run(self) -> list[Finding]:
        pids = self.processes()
        ready = self._get(f"{self.control_url}/readyz")
        self.redis(pids, ready)
        self.control(ready)
        models = self.admin(ready)
        self.gateway()
        if models is not None:
            self.models(models)
        self.workers(pids, models)
        self.metrics(pids, ready is not None)
        return self.findings

    # processes ---------------------------------------------------------------------------
    def processes(self) -> dict[str, int]:
        data_dir = self.settings.data_dir
        path = data_dir / "processes.json"
        if not data_dir.is_dir():
            self._add(
                "processes",
                "warn",
                f"no data directory {data_dir}: bastion up has not run with it; give doctor the --data-dir "
                "(or BASTION_DATA_DIR) bastion up runs with",
            )
            return {}
        if not path.exists():
            self._add(
                "processes",
                "warn",
                f"no {path}: bastion up is not running on this data directory (it writes the file once "
                f"everything is ready), or the processes were started one by one; {_START}",
            )
            return {}
        try:
            raw = json.loads(path.read_text())
            pids = {str(name): int(pid) for name, pid in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self._add("processes", "FAIL", f"{path} is unreadable: stop bastion up, remove the file, {_START}")
            return {}
        dead = sorted(name for name, pid in pids.items() if not alive(pid))
        if dead and len(dead) == len(pids):
            self._add(
                "processes",
                "FAIL",
                f"none of the {len(pids)} processes in {path} is running: bastion up stopped without removing "
                f"it (killed?); {_START}",
            )
        elif dead:
            self._add(
                "processes",
                "FAIL",
                f"not running: {', '.join(f'{n} (pid {pids[n]})' for n in dead)}; bastion up restarts a process "
                f"that exits, so if this lasts, is bastion up itself running? Why they stopped: {self.logs}/<name>.log",
            )
        else:
            self._add("processes", "ok", f"{len(pids)} alive: {', '.join(sorted(pids))}")
        return pids

    # Redis -------------------------------------------------------------------------------
    def redis(self, pids: dict[str, int], ready: httpx.Response | None) -> None:
        if self.settings.redis_url:
            self._redis_url(self.settings.redis_url)
            return
        sock = self.settings.data_dir / "redis" / "redis.sock"
        if sock.exists():
            problem = ping_unix(sock)
            if problem is None:
                self._add("redis", "ok", f"the embedded Redis answers PING on {sock}")
            else:
                self._add(
                    "redis",
                    "FAIL",
                    f"the embedded Redis does not answer on {sock} ({problem}): bastion up restarts it; why it "
                    f"stopped: {self.settings.data_dir / 'redis' / 'redis.log'}",
                )
            return
        how = "checked through the control plane's /readyz"
        if "redis" in pids:
            how += " (the embedded Redis listens on a loopback port only its config file names)"
        if ready is None:
            self._add(
                "redis",
                "warn",
                f"not checked: no embedded Redis socket at {sock}, and the control plane, which would say "
                "whether it reaches Redis, does not answer",
            )
        elif ready.status_code == 200:
            self._add("redis", "ok", f"the control plane reaches Redis ({how})")
        else:
            self._add("redis", "FAIL", f"the control plane cannot reach Redis ({how}); see {self.logs}/control.log")

    def _redis_url(self, url: str) -> None:
        import redis

        from bastion.redisconn import sync_client
        from bastion.security.tls import files_of

        try:
            client = sync_client(
                url, files_of(self.settings), socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s
            )
            try:
                client.ping()
            finally:
                client.close()
        except redis.AuthenticationError:
            self._add("redis", "FAIL", "the Redis of BASTION_REDIS_URL refuses its password: check the URL")
        except (redis.RedisError, OSError, ValueError) as exc:
            self._add(
                "redis",
                "FAIL",
                f"the Redis of BASTION_REDIS_URL does not answer ({type(exc).__name__}): is it running, "
                "and is the URL right?",
            )
        else:
            self._add("redis", "ok", "the Redis of BASTION_REDIS_URL answers PING")

    # control plane -----------------------------------------------------------------------
    def control(self, ready: httpx.Response | None) -> None:
        if ready is None:
            self._add(
                "control plane",
                "FAIL",
                f"nothing listens on {_address(self.control_url)} ({self.control_url}): is bastion up "
                f"running? {_START}; if it runs with another --control-port, give doctor the same "
                "(or --control-url / BASTION_CONTROL_URL)",
            )
            return
        try:
            body = ready.json()
        except ValueError:
            body = {}
        if ready.status_code != 200:
            self._add(
                "control plane",
                "FAIL",
                f"{self.control_url} answers but is not ready ({ready.status_code}): it cannot reach Redis; "
                f"see {self.logs}/control.log",
            )
            return
        self._add("control plane", "ok", f"ready at {self.control_url}")
        memory = (body.get("checks") or {}).get("redis_memory") or {}
        if isinstance(memory, dict) and memory.get("state", "ok") != "ok":
            share = memory.get("used_share")
            used = f"{share:.0%} of its maxmemory" if isinstance(share, int | float) else "near its maxmemory"
            self._add(
                "redis memory",
                "warn",
                f"Redis uses {used}: a full Redis refuses new jobs; raise --redis-maxmemory-mb, or find what "
                "holds memory (queues, stored results, dead letters)",
            )

    def admin(self, ready: httpx.Response | None) -> list[dict[str, Any]] | None:
        """The models list (which reads SQL), or None when it could not be had."""
        from bastion.adminclient import AdminClient, AdminError

        if ready is None:
            self._add("admin API, SQL", "warn", "not checked: the control plane does not answer")
            return None
        if self.admin_key is None:
            self._add(
                "admin API, SQL",
                "warn",
                f"not checked: no admin key; set BASTION_ADMIN_KEY or --admin-key (bastion up writes "
                f"{self.settings.admin_key_file})",
            )
            return None
        client = AdminClient(self.control_url, self.admin_key, timeout_s=self.timeout_s * 3, verify=self.verify)
        try:
            models = client.models()
        except AdminError as exc:
            what = "the admin key was refused" if str(exc.detail).startswith(("401", "403")) else "the admin API failed"
            self._add(
                "admin API, SQL",
                "FAIL",
                f"{what}: {exc.detail}; see {self.logs}/control.log (is the database reachable? BASTION_DATABASE_URL)",
            )
            return None
        finally:
            client.close()
        self._add(
            "admin API, SQL",
            "ok",
            f"the admin API reads the registry ({len(models)} model{'' if len(models) == 1 else 's'})",
        )
        return models

    # gateway -----------------------------------------------------------------------------
    def gateway(self) -> None:
        url = f"{self.gateway_url}/readyz"
        ready = self._get(url)
        if ready is None:
            self._add(
                "gateway",
                "FAIL",
                f"nothing listens on {_address(self.gateway_url)}: is bastion up running? {_START}; if it runs "
                "with another --gateway-port or --host, give doctor the same",
            )
            return
        if ready.status_code == 200:
            self._add("gateway", "ok", f"ready at {self.gateway_url}")
            return
        try:
            checks = ready.json().get("checks") or {}
        except (ValueError, AttributeError):
            checks = {}
        reasons = {
            "snapshot": "no snapshot from the control plane yet (is the control plane up?)",
            "redis": "it cannot reach Redis",
            "replies": "its reply reader is down",
        }
        why = [text for name, text in reasons.items() if checks.get(name) is False]
        if checks.get("draining"):
            why.append("it is draining (stopping)")
        self._add(
            "gateway",
            "FAIL",
            f"{self.gateway_url} answers but is not ready ({ready.status_code}): "
            f"{'; '.join(why) or 'see its log'}; see {self.logs}/gateway-0.log",
        )

    # models and workers ------------------------------------------------------------------
    def models(self, models: list[dict[str, Any]]) -> None:
        if not models:
            self._add("models", "warn", "no model registered: bastion models register NAME FILE.onnx")
            return
        serving, problems = [], []
        for model in models:
            name = model.get("name")
            deployment = model.get("deployment") or {}
            primary = [r.get("version") for r in deployment.get("routes") or [] if r.get("role") == "primary"]
            if deployment.get("disabled"):
                problems.append(f"{name} is disabled (kill switch): bastion deploy enable {name}")
            elif not primary:
                problems.append(f"{name} has no primary route: bastion models stage {name} VERSION production")
            else:
                serving.append(f"{name} v{primary[0]}")
        detail = "; ".join([f"serving: {', '.join(serving) or 'none'}", *problems])
        self._add("models", "warn" if problems else "ok", detail)

    def _metrics_port(self, name: str, setting: str) -> int:
        from bastion.embedded.endpoints import DEFAULT_METRICS_PORTS

        if name in self.known_metrics:  # as the running bastion up recorded it
            return self.known_metrics[name]
        index = int(name.rpartition("-")[2] or 0)
        base = int(getattr(self.settings, setting)) or DEFAULT_METRICS_PORTS[setting]
        return base + index

    def _names(self, pids: dict[str, int], role: str, setting: str) -> list[str]:
        """The processes of ``role`` to look at: those bastion up recorded, else ``<role>-0`` when
        its metrics port is set."""
        names = sorted(n for n in pids if n.startswith(f"{role}-"))
        if not names and not pids and getattr(self.settings, setting):
            names = [f"{role}-0"]
        return names

    def workers(self, pids: dict[str, int], models: list[dict[str, Any]] | None) -> None:
        names = self._names(pids, "worker", "worker_metrics_port")
        if not names:
            self._add(
                "workers",
                "warn",
                "not checked: no processes.json names the workers and --worker-metrics-port is not set",
            )
            return
        routed = sum(
            len({r.get("version") for r in (m.get("deployment") or {}).get("routes") or []}) for m in models or []
        )
        for name in names:
            port = self._metrics_port(name, "worker_metrics_port")
            response = self._get(f"{self.metrics_scheme}://{self.metrics_host}:{port}/metrics")
            found = _LOADED.search(response.text) if response is not None and response.status_code == 200 else None
            if found is None:
                self._add(
                    name,
                    "warn",
                    f"models loaded not checked: no worker metrics on {self.metrics_host}:{port} (the port may have "
                    f"been taken at start: metrics_port_in_use in {self.logs}/{name}.log; choose another first port "
                    "with --worker-metrics-port)",
                )
                continue
            loaded = int(float(found.group(1)))
            if loaded == 0 and routed:
                self._add(
                    name,
                    "warn",
                    f"no model version loaded ({routed} routed): workers load them on each snapshot; look for "
                    f"model_load_failed or artifact_refused in {self.logs}/{name}.log",
                )
            else:
                self._add(name, "ok", f"{loaded} model version{'s' if loaded != 1 else ''} loaded")

    def metrics(self, pids: dict[str, int], control_up: bool) -> None:
        answering: list[str] = []
        silent: list[str] = []
        if control_up:
            control = self._get(f"{self.control_url}/metrics")
            (answering if control is not None and control.status_code == 200 else silent).append(
                f"control {_address(self.control_url)}"
            )
        for role, setting in (("gateway", "gateway_metrics_port"), ("worker", "worker_metrics_port")):
            for name in self._names(pids, role, setting):
                port = self._metrics_port(name, setting)
                response = self._get(f"{self.metrics_scheme}://{self.metrics_host}:{port}/metrics")
                (answering if response is not None and response.status_code == 200 else silent).append(f"{name} {port}")
        if silent:
            self._add(
                "metrics",
                "warn",
                f"no answer: {', '.join(silent)} on {self.metrics_host}; a port taken at start leaves that "
                "process without metrics (metrics_port_in_use in its log): choose other first ports with "
                "--gateway-metrics-port / --worker-metrics-port",
            )
        if answering:
            self._add("metrics", "ok", f"answering: {', '.join(answering)}")
        elif not silent:
            self._add("metrics", "warn", "not checked: no metrics port is known (no processes.json)")


def show_findings(findings: list[Finding]) -> None:
    rows = [[f.check, output.styled(f.status, _STYLES[f.status]), f.detail] for f in findings]
    output.show_table(["check", "status", "detail"], rows, whole=("status",))


def doctor(
    as_json: Annotated[
        bool, typer.Option("--json", help="print the checks as JSON: [{check, status, detail}]")
    ] = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
    **options: Any,
) -> None:
    """Check a running installation (processes, Redis, control plane, SQL, gateway, models, workers,
    metrics) and say what is wrong. Give it the options bastion up runs with (ports, hosts, data
    directory). Exit status 1 when a check fails."""
    from bastion.embedded import endpoints

    settings = build_settings({**options, "data_dir": data_dir})
    url = control_url.rstrip("/") if control_url else endpoints.control_url(settings)
    findings = Doctor(settings, url, admin_key_of(admin_key, data_dir)).run()
    if as_json:
        output.print_json([asdict(f) for f in findings])
    else:
        show_findings(findings)
    raise typer.Exit(1 if any(f.status == "FAIL" for f in findings) else 0)


command: Callable[..., Any] = settings_options(DOCTOR_FIELDS)(doctor)
__all__ = ["Doctor", "Finding", "command"]
