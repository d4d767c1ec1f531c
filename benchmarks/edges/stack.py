"""One ``bastion up --gateways 2`` for the edge benchmark, and what can be observed of it.

``Stack.start`` runs the real supervisor in a temporary data directory on free ports, reads the
demo key from its first-run banner and the admin key from ``<data dir>/admin.key``, and finds
the admin API (on ``--control-host`` where the code has it, else on ``--host``). ``Sampler``
samples every process of the stack from ``/proc`` (CPU time, peak RSS, children included) and
``redis_info`` reads the embedded Redis's INFO over its unix socket. ``Stack.stop`` sends SIGINT
(as Ctrl-C) and kills whatever is left of the process tree after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from bench_predict import descendants  # benchmarks/ is on sys.path (bench_edges.py)

KEY_RE = re.compile(r"bst_[A-Za-z0-9_-]+")
LOOPBACK = "127.0.0.1"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class StackError(Exception):
    """The stack would not start or answer as expected."""


def free_port(host: str = LOOPBACK, span: int = 1) -> int:
    """A port free on ``host`` whose next ``span - 1`` ports are free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port + span >= 65535:
            continue
        ok = True
        for extra in range(1, span):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port + extra))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise StackError("no free port range found")


def _stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, RSS KiB) of one process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[21]) * _PAGE_KIB


def rss_mb(pid: int) -> float:
    """The resident set of one process, MB (0 when it is gone)."""
    got = _stat(pid)
    return got[1] / 1024 if got is not None else 0.0


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    """Process name -> CPU seconds so far, its children included."""
    out: dict[str, float] = {}
    for name, pid in pids.items():
        own = _stat(pid)
        if own is not None:
            out[name] = own[0] + sum(got[0] for c in descendants(pid) if (got := _stat(c)) is not None)
    return out


@dataclass
class Window:
    """What the stack's processes did while a window lasted."""

    seconds: float
    cpu_pct: dict[str, float]  # process name -> share of one core, children included
    peak_rss_mb: dict[str, float]  # process name -> highest RSS of the process itself
    peak_child_rss_mb: dict[str, float]  # process name -> highest RSS of its children alone
    start_rss_mb: dict[str, float]  # process name -> its RSS when the window opened
    restarted: list[str]  # processes whose pid changed or vanished


class Sampler:
    """Samples every process of the stack every ``interval_s`` while a window is open."""

    def __init__(self, stack: Stack, interval_s: float = 0.05) -> None:
        self._stack = stack
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak: dict[str, float] = {}
        self._peak_child: dict[str, float] = {}
        self._cpu0: dict[str, float] = {}
        self._cpu1: dict[str, float] = {}
        self._started = 0.0
        self._pids: dict[str, int] = {}
        self._start_rss: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        cpu: dict[str, float] = {}
        for name, pid in self._pids.items():
            own = _stat(pid)
            if own is None:
                continue
            total_cpu, rss = own
            child_rss = 0
            for child in descendants(pid):
                got = _stat(child)
                if got is not None:
                    total_cpu += got[0]
                    child_rss += got[1]
            cpu[name] = total_cpu
            self._peak[name] = max(self._peak.get(name, 0.0), rss / 1024)
            self._peak_child[name] = max(self._peak_child.get(name, 0.0), child_rss / 1024)
        return cpu

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._cpu1 = self._sample()

    def start(self) -> None:
        self._pids = self._stack.pids()
        self._peak, self._peak_child = {}, {}
        self._stop.clear()
        self._started = time.monotonic()
        self._cpu0 = self._cpu1 = self._sample()
        self._start_rss = dict(self._peak)
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Window:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._cpu1 = self._sample()
        seconds = max(time.monotonic() - self._started, 1e-6)
        now = self._stack.pids()
        restarted = [name for name, pid in self._pids.items() if now.get(name) != pid or _stat(pid) is None]
        cpu = {n: 100.0 * (self._cpu1[n] - self._cpu0[n]) / seconds for n in self._cpu1 if n in self._cpu0}
        return Window(seconds, cpu, dict(self._peak), dict(self._peak_child), dict(self._start_rss), restarted)


@dataclass
class Stack:
    """A running ``bastion up`` and how to reach it."""

    command: list[str]
    env: dict[str, str]
    host: str  # the gateway's --host: a loopback alias standing in for a public address
    extra_args: list[str] = field(default_factory=list)
    keep_data: bool = False
    data_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bench-edges-")))
    gateway_port: int = 0
    control_port: int = 0
    admin_url: str = ""
    demo_key: str = ""
    admin_key: str = ""
    process: subprocess.Popen[bytes] | None = None
    _redis: redis.Redis | None = None
    _tree: list[int] = field(default_factory=list)

    # lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        self.gateway_port = free_port(LOOPBACK)
        self.control_port = free_port(LOOPBACK)
        argv = [
            *self.command,
            "up",
            "--data-dir",
            str(self.data_dir),
            "--gateways",
            "2",
            "--workers",
            "1",
            "--host",
            self.host,
            "--gateway-port",
            str(self.gateway_port),
            "--control-port",
            str(self.control_port),
            "--gateway-metrics-port",
            str(free_port(LOOPBACK, span=2)),
            "--worker-metrics-port",
            str(free_port(LOOPBACK)),
            *self.extra_args,
        ]
        with open(self.data_dir / "bastion-up.out", "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(f"bastion up exited ({self.process.returncode}): {self.output()[-2000:]}")
            if (self.data_dir / "processes.json").exists() and self._ready():
                break
            time.sleep(0.2)
        else:
            raise StackError(f"bastion up was not ready in {timeout_s:.0f} s: {self.output()[-2000:]}")
        found = KEY_RE.search(self.output())
        if found is None:
            raise StackError("no API key in the first-run banner")
        self.demo_key = found.group(0)
        self.admin_key = (self.data_dir / "admin.key").read_text().strip()
        self.admin_url = self._find_admin()
        self._tree = [self.process.pid, *descendants(self.process.pid)]

    def _ready(self) -> bool:
        try:
            return httpx.get(f"http://{self.host}:{self.gateway_port}/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _find_admin(self) -> str:
        for host in (LOOPBACK, self.host):
            url = f"http://{host}:{self.control_port}"
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{url}/admin/v1/models", timeout=2.0)
                return url
        raise StackError("the admin API answers on neither address")

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "bastion-up.out").read_text(errors="replace")
        return ""

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGINT to bastion up, then SIGKILL to anything of its tree still alive; its exit code."""
        if self.process is None:
            return None
        tree = {*self._tree, *descendants(self.process.pid), *self.pids().values()}
        if self._redis is not None:
            self._redis.close()
        code: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.process.wait(grace_s)
        else:
            code = self.process.returncode
        for pid in tree:
            if _stat(pid) is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(5)
        if not self.keep_data:
            subprocess.run(["rm", "-rf", str(self.data_dir)], check=False)
        return code

    # observation -------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        """Process name -> pid, from processes.json (redis, control, gateway-0/1, worker-0)."""
        with contextlib.suppress(OSError, ValueError):
            loaded: dict[str, int] = json.loads((self.data_dir / "processes.json").read_text())
            return loaded
        return {}

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            conf: dict[str, str] = {}
            for line in (self.data_dir / "redis" / "redis.conf").read_text().splitlines():
                name, _, value = line.partition(" ")
                conf[name] = value
            if "unixsocket" in conf:
                self._redis = redis.Redis(unix_socket_path=conf["unixsocket"], password=conf["requirepass"])
            else:
                self._redis = redis.Redis(host=LOOPBACK, port=int(conf["port"]), password=conf["requirepass"])
        return self._redis

    def redis_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self.redis.info()
        got: dict[Any, Any] = self.redis.config_get("maxmemory")
        info["maxmemory_config"] = int(got.get("maxmemory") or got.get(b"maxmemory") or 0)
        return info

    def gateway(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"


class RssWatch:
    """Peak RSS of one process and of its children, sampled every 20 ms while open (a context)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_mb = rss_mb(pid)
        self.peak_mb = self.start_mb
        self.peak_children_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            children = sum(rss_mb(c) for c in descendants(self.pid))
            self.peak_children_mb = max(self.peak_children_mb, children)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
