"""Real processes for tests: a private Redis server and a Bastion stack of OS processes.

Nothing here is a stand-in: Redis is the real ``redis-server``, the gateway, workers and
control plane are the real ``python -m bastion ...`` processes, talking over sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from bastion import demo
from bastion.adminclient import AdminClient
from bastion.constants import SNAPSHOT_KEY
from bastion.embedded.redis_server import EmbeddedRedis, free_port
from bastion.redisconn import sync_client
from bastion.security import certs
from bastion.security.tls import TLSFiles
from bastion.settings import Settings


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test stops with Ctrl-C (SIGINT), as a terminal would: a
    shell starts background jobs with SIGINT ignored, and a child inherits that (bash cannot trap an
    ignored signal; Python raises no KeyboardInterrupt), so restore the default first."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def http_ok(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1.0, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return data.data.astype(np.float32), data.target


class Stack:
    """Redis + control plane + gateways + workers, each a real process."""

    def __init__(
        self, root: Path, *, workers: int = 1, gateways: int = 1, secure: bool = False, **settings: Any
    ) -> None:
        """``secure``: TLS on every hop - a CA and role certificates in ``root/tls``, Redis on TLS
        with client certificates, HTTPS gateways and admin API (``verify`` is the clients' context)."""
        self.root = root
        self.secure = secure
        self.certs = root / "tls"
        self.verify: ssl.SSLContext | bool = True
        redis_tls = None
        if secure:
            certs.init(self.certs)
            redis_tls = TLSFiles(self.certs / "redis.pem", self.certs / "redis-key.pem", self.certs / "ca.pem")
            # the clients' context: verifies the servers, presents the admin certificate (metrics, mTLS)
            self.verify = TLSFiles(
                self.certs / "admin.pem", self.certs / "admin-key.pem", self.certs / "ca.pem"
            ).client_context()
        self.redis = EmbeddedRedis(root / "redis", tls=redis_tls)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.n_workers = workers
        self.n_gateways = gateways
        # Tests send many failing requests from one address on purpose; abuse handling is tested
        # on its own (tests/security/test_abuse.py) with its real thresholds.
        # Gateways stop at once (the drain delay is tested on its own, tests/test_serving.py).
        self.settings_overrides = {
            "abuse_tarpit_after": 1_000_000,
            "abuse_ban_after": 1_000_000,
            "drain_s": 0,
            **settings,
        }
        self.gateway_urls: list[str] = []
        self.gateway_metrics_ports: list[int] = []  # gateway i's private metrics port (on control_host)
        self.control_url = ""
        self.admin_key = ""
        self.keys: dict[str, str] = {}

    # lifecycle ---------------------------------------------------------------------------
    def start(self) -> Stack:
        url = self.redis.start()
        tls = {}
        if self.secure:  # the control plane's; each process's environment names its own role's
            tls = {"tls_cert": self.certs / "control.pem", "tls_key": self.certs / "control-key.pem"}
            tls["tls_ca"] = self.certs / "ca.pem"
        self.settings = Settings(
            data_dir=self.root,
            redis_url=url,
            control_port=free_port(),
            **{"log_level": "warning", **tls, **self.settings_overrides},
        )
        self.env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        scheme = "https" if self.secure else "http"
        self.control_url = f"{scheme}://127.0.0.1:{self.settings.control_port}"
        self._spawn("control", ["control"], self.role_tls("control"))
        wait_until(lambda: http_ok(f"{self.control_url}/readyz", self.verify), 60, "the control plane")
        self.admin_key = self.settings.admin_key_file.read_text().strip()
        self.admin = AdminClient(self.control_url, self.admin_key, verify=self.verify)
        self.version = self.admin.register(demo.MODEL_NAME, demo.model_bytes())
        for tenant in ("acme", "globex"):
            self.keys[tenant] = self.admin.create_key(tenant, "test")["key"]
        # A key operators trust to name its routing subject (X-Bastion-Subject): canary tests.
        for tenant in ("acme", "globex"):
            self.keys[f"{tenant}-subjects"] = self.admin.create_key(tenant, "subjects", subject_trusted=True)["key"]
        for i in range(self.n_workers):
            self.start_worker(i)
        for i in range(self.n_gateways):
            port = free_port()
            # Every gateway gets its metrics port (port + i, as under bastion up, when one is set).
            base = self.settings.gateway_metrics_port
            metrics_port = base + i if base else free_port()
            self._spawn(
                f"gateway-{i}",
                ["gateway"],
                {
                    "BASTION_GATEWAY_PORT": str(port),
                    "BASTION_GATEWAY_ID": f"gw{i}",
                    "BASTION_GATEWAY_METRICS_PORT": str(metrics_port),
                    **self.role_tls("gateway"),
                },
            )
            self.gateway_urls.append(f"{scheme}://127.0.0.1:{port}")
            self.gateway_metrics_ports.append(metrics_port)
        for gw in self.gateway_urls:
            wait_until(lambda gw=gw: http_ok(f"{gw}/readyz", self.verify), 60, f"gateway {gw}")
        return self

    def role_tls(self, role: str) -> dict[str, str]:
        """The certificate variables of a process of ``role`` (none unless ``secure``)."""
        if not self.secure:
            return {}
        return {
            "BASTION_TLS_CERT": str(self.certs / f"{role}.pem"),
            "BASTION_TLS_KEY": str(self.certs / f"{role}-key.pem"),
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "bastion", *args],
            env={**self.env, **env},
            stdout=log,
            stderr=log,
            start_new_session=True,  # its own process group: a signal reaches a worker's forked loop too
        )
        log.close()

    def start_worker(self, i: int, **env: str) -> None:
        own = {"BASTION_WORKER_NAME": f"worker-{i}"}
        if self.settings.worker_metrics_port:  # worker i listens on port + i, as under bastion up
            own["BASTION_WORKER_METRICS_PORT"] = str(self.settings.worker_metrics_port + i)
        self._spawn(f"worker-{i}", ["worker"], {**own, **self.role_tls("worker"), **env})

    @contextlib.contextmanager
    def keep_workers(self) -> Iterator[list[str]]:
        """Restart any worker that exits, at once and under its own name, as ``bastion up`` does
        (without its backoff); yields the list of restarts made so far."""
        restarts: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.02):
                for i in range(self.n_workers):
                    name = f"worker-{i}"
                    if self.procs[name].poll() is not None and not stop.is_set():
                        self.start_worker(i)
                        restarts.append(name)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield restarts
        finally:
            stop.set()
            thread.join()

    def signal(self, name: str, signum: int) -> None:
        """Signal the process and what it forked (a worker's loop and its children) - SIGSTOP freezes
        a worker, SIGCONT wakes it; SIGTERM reaches the master, which stops its loop."""
        proc = self.procs[name]
        if signum == signal.SIGTERM or proc.poll() is not None:
            proc.send_signal(signum)
        else:
            os.killpg(proc.pid, signum)

    def wait(self, name: str, timeout_s: float = 20) -> int:
        return self.procs[name].wait(timeout_s)

    def stop(self) -> None:
        for _name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if hasattr(self, "admin"):
            self.admin.close()
        self.redis.stop()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def log_tails(self, lines: int = 25) -> str:
        """The last ``lines`` lines of every process's log (attached to a failed test's report)."""
        parts = []
        for name in self.procs:
            path = self.root / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}.log (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    # clients -----------------------------------------------------------------------------
    @property
    def gateway(self) -> str:
        return self.gateway_urls[0]

    def gateway_metrics_url(self, gateway: int = 0) -> str:
        """Where gateway ``gateway`` serves its Prometheus metrics (private; not the public port)."""
        return f"http://127.0.0.1:{self.gateway_metrics_ports[gateway]}/metrics"

    def gateway_metrics(self, gateway: int = 0) -> str:
        """Gateway ``gateway``'s Prometheus metrics, as text."""
        return httpx.get(self.gateway_metrics_url(gateway), timeout=10.0).text

    def client(self, tenant: str = "acme", gateway: int = 0, **kwargs: Any) -> httpx.Client:
        """A client of gateway ``gateway`` with key ``keys[tenant]`` (a tenant, or a key's label)."""
        return httpx.Client(
            base_url=self.gateway_urls[gateway],
            headers={"Authorization": f"Bearer {self.keys[tenant]}", **kwargs.pop("headers", {})},
            timeout=kwargs.pop("timeout", 30.0),
            verify=kwargs.pop("verify", self.verify),
            **kwargs,
        )

    def redis_client(self) -> redis.Redis:
        return sync_client(self.settings.require_redis_url(), self.redis.tls)

    def published_snapshot(self) -> bytes:
        """The snapshot the control plane published (raw JSON, as gateways read it)."""
        client = self.redis_client()
        try:
            raw = client.get(SNAPSHOT_KEY)
        finally:
            client.close()
        assert raw is not None, "no snapshot published"
        return bytes(raw)


class Up:
    """``bastion up`` as a child process (its banner read from stdout, stopped with Ctrl-C)."""

    def __init__(
        self,
        data_dir: Path,
        gateway_port: int,
        control_port: int,
        env: dict[str, str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.gateway_port = gateway_port
        self.control_port = control_port
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bastion",
                "up",
                "--data-dir",
                str(data_dir),
                "--gateway-port",
                str(gateway_port),
                "--control-port",
                str(control_port),
                "--log-level",
                "warning",
                *(extra or []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.out = ""

    def read_banner(self, timeout_s: float = 90) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while "Press Ctrl-C" not in self.out:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(
                    f"bastion up exited: {self.out}\n{self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            self.out += line
            assert time.monotonic() < deadline, self.out
        return self.out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(60)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def pids(self) -> dict[str, int]:
        return dict(json.loads((self.data_dir / "processes.json").read_text()))


LIVE: list[Stack] = []  # the stacks running now: a failed test's report carries their log tails


@contextlib.contextmanager
def running(root: Path, **settings: Any) -> Iterator[Stack]:
    """A started stack, stopped on the way out (module fixtures ``yield`` from inside it)."""
    stack = Stack(root, **settings)
    LIVE.append(stack)
    try:
        try:
            stack.start()
        except Exception as exc:  # a stack that did not start: say what its processes logged
            raise AssertionError(f"{exc}\n{stack.log_tails()}") from exc
        yield stack
    finally:
        LIVE.remove(stack)
        stack.stop()
