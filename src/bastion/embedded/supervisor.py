"""``bastion up``: Redis, control plane, gateways and workers as separate, supervised processes.

The supervisor binds the public gateway port (on ``host``) and the admin port (on
``control_host``, loopback by default) itself, so a taken port is reported before anything
starts, and hands the listening sockets to the gateway and control processes. Metrics are on
private ports of ``control_host``: gateway ``i`` on ``gateway_metrics_port + i`` (9101 + i when
unset), worker ``i`` on ``worker_metrics_port + i`` (9201 + i); a port already taken is logged
(``metrics_port_in_use``, naming the port and the setting) and leaves that process's metrics off
rather than failing the start. The embedded Redis is bounded by ``redis_maxmemory_mb``.

With ``--tls`` every hop is encrypted: a private CA and one certificate per role in
``<data dir>/tls`` (made on the first such start, reissued when one has under a week left), the
embedded Redis on a TLS port demanding client certificates, each process given its role's
certificate, HTTPS on the gateway and admin API; the banner's curl carries ``--cacert``.

A process that exits unexpectedly is restarted with a backoff; Ctrl-C (SIGINT) or SIGTERM stops
gateways first, then workers (which finish their batch), then the control plane and Redis.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bastion import demo, logs
from bastion.adminclient import AdminClient
from bastion.embedded.endpoints import DEFAULT_METRICS_PORTS, Endpoints, client_host
from bastion.embedded.endpoints import FILE_NAME as ENDPOINTS_FILE
from bastion.embedded.redis_server import EmbeddedRedis
from bastion.errors import BastionError, Unavailable
from bastion.procs import die_with_parent
from bastion.security import certs
from bastion.security.tls import TLSFiles
from bastion.settings import GATEWAYS_RULE, WORKERS_RULE, Settings, usable_cpus
from bastion.text.jobs import TASK_EMBEDDING, TASK_GENERATION

log = logs.get("bastion.up")
DEMO_CHAT = "demo-chat"  # bastion.demo.text_models.CHAT_NAME
DEMO_CHAT_GUARDS = {"injection": "block", "canary": "block", "pii_out": "redact"}
RENEW_BEFORE = 7 * 86_400  # seconds: --tls reissues the role certificates when one has less left


class PortInUse(BastionError):
    title = "Port in use"


class AlreadyRunning(BastionError):
    title = "Already running"


# Settings a role must not receive: gateways and workers hold no SQL credentials or admin key.
_WITHHELD = {
    "gateway": {"database_url", "admin_key"},
    "worker": {"database_url", "admin_key"},
    "control": set(),
}


def probe_port(host: str, port: int, flag: str) -> None:
    """Raise ``PortInUse`` (naming ``flag``) when anything holds ``port`` on ``host``: bound without
    SO_REUSEPORT, so a port another program holds is reported instead of silently shared."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use; choose another with {flag} "
                    f"or BASTION_{flag.removeprefix('--').replace('-', '_').upper()}"
                ) from exc
            raise


def bind_port(host: str, port: int, flag: str, count: int = 1) -> list[socket.socket]:
    """Bind ``count`` listening sockets on one port (SO_REUSEPORT when more than one).

    The port is first probed (``probe_port``). With one socket per gateway process, the kernel
    spreads new connections evenly across the processes.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe_port(host, port, flag)
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if count > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        sockets.append(sock)
    return sockets


def metrics_port(host: str, setting: str, base: int, i: int) -> int:
    """The metrics port of process ``i`` for ``setting`` (``base`` or, when 0, its default, plus
    ``i``), or 0 (off) when that port is taken on ``host``: logged, never fatal."""
    port = (base or DEFAULT_METRICS_PORTS[setting]) + i
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server binds it
        try:
            probe.bind((host, port))
        except (OSError, OverflowError) as exc:
            log.warning(
                "metrics_port_in_use",
                port=port,
                host=host,
                setting=f"--{setting.replace('_', '-')}",
                error_type=type(exc).__name__,
                detail=f"port {port} on {host} is taken; this process runs without metrics "
                f"(choose another first port with --{setting.replace('_', '-')})",
            )
            return 0
    return port


def register_text_demos(client: AdminClient) -> None:
    """Register the demo text models (``bastion.demo.text_models``, built in code in well under a
    second): ``demo-embed`` (embeddings) and ``demo-chat`` (a chat LLM, guarded: injection screen
    and canary block, PII in answers redacted)."""
    from bastion.demo import text_models  # onnx and tokenizers: only on a first run

    tokenizer = text_models.tokenizer_json()
    client.register(
        text_models.ENCODER_NAME,
        text_models.encoder_onnx(),
        description="demo embedding model (random weights, not semantically meaningful)",
        tokenizer=tokenizer,
        text={"task": TASK_EMBEDDING, "config": text_models.embedding_config()},
    )
    client.register(
        DEMO_CHAT,
        text_models.causal_lm_onnx(),
        description="demo chat model (a lookup table: it always says the same sentence)",
        tokenizer=tokenizer,
        text={"task": TASK_GENERATION, "config": text_models.generation_config()},
    )
    client.set_guards(DEMO_CHAT, DEMO_CHAT_GUARDS)


def cli_name() -> str:
    """How the reader runs the CLI: ``./bastion`` in a checkout, else ``bastion`` if on the PATH."""
    wrapper = Path.cwd() / "bastion"
    if wrapper.is_file() and os.access(wrapper, os.X_OK):
        return "./bastion"
    return "bastion" if shutil.which("bastion") else f"{sys.executable} -m bastion"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff_s: float = 0.5
    log_path: Path | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self.argv,
            env=self.env,
            pass_fds=self.pass_fds,
            stdout=out,
            stderr=out,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if self.log_path:
            out.close()  # type: ignore[union-attr]
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.redis: EmbeddedRedis | None = None
        self.stopping = False
        self.sockets: list[socket.socket] = []
        self.wrote_pids = False  # only the instance that wrote processes.json removes it
        self.metrics: dict[str, int] = {}  # process name -> its metrics port (0: off)
        self.certs = settings.data_dir / "tls"
        self.verify: ssl.SSLContext | bool = True  # how the supervisor's own requests check HTTPS

    # set-up ------------------------------------------------------------------------------
    def _child(self, name: str, args: list[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> Child:
        logs_dir = self.settings.data_dir / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        return Child(
            name=name,
            argv=[sys.executable, "-m", "bastion", *args],
            env=env,
            pass_fds=fds,
            log_path=logs_dir / f"{name}.log",
        )

    def _lock(self) -> None:
        """One ``bastion up`` per data directory: a second would share the Redis AOF and SQLite."""
        path = self.settings.data_dir / "bastion.lock"
        self._lock_file = open(path, "a+")
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._lock_file.close()
            raise AlreadyRunning(
                f"another bastion up is running on {self.settings.data_dir}; stop it or use another --data-dir"
            ) from exc

    def _env(self, role: str, redis_url: str) -> dict[str, str]:
        """The child's environment: ours without BASTION_*, plus only the settings its role may hold."""
        settings = self.settings.model_copy(update={"redis_url": redis_url})
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        withheld = {f"BASTION_{name.upper()}" for name in _WITHHELD[role]}
        env.update({k: v for k, v in settings.to_env().items() if k not in withheld})
        env["PYTHONUNBUFFERED"] = "1"
        if self.settings.tls:
            env["BASTION_TLS_CERT"] = str(certs.cert_path(self.certs, role))
            env["BASTION_TLS_KEY"] = str(certs.key_path(self.certs, role))
            env["BASTION_TLS_CA"] = str(certs.cert_path(self.certs, "ca"))
        return env

    def _certificates(self) -> TLSFiles:
        """The CA and role certificates of ``--tls`` (made or renewed here); the Redis server's files."""
        hosts = tuple(h for h in {self.settings.host, self.settings.control_host} if h not in {"0.0.0.0", "::", ""})  # noqa: S104
        if not certs.cert_path(self.certs, "ca").exists():
            certs.init(self.certs, hosts)
            log.info("tls_certificates_created", directory=str(self.certs))
        elif certs.expires_within(self.certs, RENEW_BEFORE):
            certs.rotate(self.certs, hosts)
            log.info("tls_certificates_renewed", directory=str(self.certs))
        self.verify = TLSFiles(ca=certs.cert_path(self.certs, "ca")).client_context()
        return TLSFiles(
            certs.cert_path(self.certs, "redis"), certs.key_path(self.certs, "redis"), certs.cert_path(self.certs, "ca")
        )

    def start(self) -> str:
        """Start everything; return the first-run banner text."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        gateway_socks = bind_port(s.host, s.gateway_port, "--gateway-port", s.gateways)
        (control_sock,) = bind_port(s.control_host, s.control_port, "--control-port")
        self.sockets = [*gateway_socks, control_sock]
        if s.grpc_port:  # each gateway binds it itself (SO_REUSEPORT); nothing else may hold it
            probe_port(s.host, s.grpc_port, "--grpc-port")
        redis_tls = self._certificates() if s.tls else None
        redis_url = s.redis_url
        if not redis_url:
            self.redis = EmbeddedRedis(
                s.data_dir / "redis", fsync=s.durability, maxmemory_mb=s.redis_maxmemory_mb, tls=redis_tls
            )
            redis_url = self.redis.start()
        control = self._child(
            "control",
            ["control", "--fd", str(control_sock.fileno())],
            self._env("control", redis_url),
            (control_sock.fileno(),),
        )
        control.start()
        self.children.append(control)
        admin_key = self._wait_for_admin_key()
        banner = self._first_run(admin_key)
        for i in range(s.workers):
            wenv = {**self._env("worker", redis_url), "BASTION_WORKER_NAME": f"worker-{i}"}
            port = metrics_port(s.control_host, "worker_metrics_port", s.worker_metrics_port, i)
            wenv["BASTION_WORKER_METRICS_PORT"] = str(port)
            self.metrics[f"worker-{i}"] = port
            self.children.append(self._child(f"worker-{i}", ["worker"], wenv))
        for i, sock in enumerate(gateway_socks):
            fd = sock.fileno()
            genv = self._env("gateway", redis_url)
            port = metrics_port(s.control_host, "gateway_metrics_port", s.gateway_metrics_port, i)
            genv["BASTION_GATEWAY_METRICS_PORT"] = str(port)
            self.metrics[f"gateway-{i}"] = port
            self.children.append(self._child(f"gateway-{i}", ["gateway", "--fd", str(fd)], genv, (fd,)))
        for child in self.children[1:]:
            child.start()
        self._wait_ready(f"{self._gateway_url()}/readyz", "gateway")
        self._write_pids()
        return f"{banner}\n{self._where()}\n{self._sizing()}\n{self._next()}"

    def _write_pids(self) -> None:
        """Record the process ids in ``<data dir>/processes.json`` for operators and tests."""
        pids = {c.name: c.process.pid for c in self.children if c.process is not None}
        if self.redis is not None and self.redis.process is not None:
            pids["redis"] = self.redis.process.pid
        target = self.settings.data_dir / "processes.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids, indent=2))
        os.replace(tmp, target)  # readers never see a half-written file
        ca = str(certs.cert_path(self.certs, "ca")) if self.settings.tls else None
        Endpoints(self._gateway_url(), self._control_url(), dict(self.metrics), ca).write(self.settings.data_dir)
        self.wrote_pids = True

    @property
    def _scheme(self) -> str:
        return "https" if self.settings.tls else "http"

    def _gateway_url(self) -> str:
        return f"{self._scheme}://{client_host(self.settings.host)}:{self.settings.gateway_port}"

    def _control_url(self) -> str:
        return f"{self._scheme}://{client_host(self.settings.control_host)}:{self.settings.control_port}"

    def _where(self) -> str:
        """Where everything listens: the public gateway, the admin API and the metrics ports."""
        s = self.settings
        on = {name: port for name, port in self.metrics.items() if port}
        off = sorted(set(self.metrics) - set(on))
        ports = ", ".join(f"{name} {port}" for name, port in on.items()) or "none"
        host = f"[{s.host}]" if ":" in s.host else s.host
        grpc = f", gRPC {host}:{s.grpc_port}" if s.grpc_port else ""
        grpc = f"{grpc} (TLS)" if grpc and s.tls else grpc
        tls = f"\nTLS on every hop; CA and certificates in {self.certs}." if s.tls else ""
        return (
            f"Gateway (public): {self._scheme}://{s.host}:{s.gateway_port}{grpc}. "
            f"Admin API: {self._scheme}://{s.control_host}:{s.control_port}.{tls}"
            f"\nMetrics on {s.control_host}: {ports}" + (f" (off, port taken: {', '.join(off)})" if off else "") + "."
        )

    def _sizing(self) -> str:
        """How many processes run and why: sized to the machine unless the flags said otherwise."""
        s, given = self.settings, self.settings.model_fields_set
        gateways = "as set" if "gateways" in given else GATEWAYS_RULE  # by --gateways or BASTION_GATEWAYS
        workers = "as set" if "workers" in given else WORKERS_RULE
        threads = s.ort_intra_threads or "onnxruntime decides"
        return (
            f"Processes for {usable_cpus()} CPUs: {s.gateways} gateway{'s' * (s.gateways != 1)} ({gateways}), "
            f"{s.workers} worker{'s' * (s.workers != 1)} ({workers}); onnxruntime threads per model session: "
            f"{threads} (--ort-intra-threads)."
        )

    def _next(self) -> str:
        cli = cli_name()
        return f"In another shell: {cli} models list, {cli} keys create --tenant demo, {cli} doctor."

    def _wait_ready(self, url: str, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=1.0, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise Unavailable(
            f"the {what} did not become ready in {timeout_s:.0f} s; see {self.settings.data_dir / 'logs'}"
        )

    def _wait_for_admin_key(self) -> str:
        self._wait_ready(f"{self._control_url()}/readyz", "control plane")
        if self.settings.admin_key is not None:
            return self.settings.admin_key.get_secret_value()
        return self.settings.admin_key_file.read_text().strip()

    def _first_run(self, admin_key: str) -> str:
        client = AdminClient(self._control_url(), admin_key, verify=self.verify)
        try:
            if any(m["name"] == demo.MODEL_NAME for m in client.models()):
                return (
                    "Bastion is running.\n"
                    f"API keys are shown only when created; make one with: {cli_name()} keys create --tenant demo\n"
                )
            client.register(demo.MODEL_NAME, demo.model_bytes(), metadata=demo.metadata())
            register_text_demos(client)
            key = client.create_key("demo", "first key")
        finally:
            client.close()
        url = f"{self._gateway_url()}/v1/models/{demo.MODEL_NAME}/predict"
        cacert = f" --cacert {certs.cert_path(self.certs, 'ca')}" if self.settings.tls else ""
        return (
            "Bastion is running. Your first API key (shown once, stored only as a hash):\n\n"
            f"    {key['key']}\n\n"
            "Try it:\n\n"
            f"curl -s{cacert} {url} \\\n  -H 'Authorization: Bearer {key['key']}' \\\n"
            f"  -H 'Content-Type: application/json' \\\n  -d '{demo.sample_request()}'\n\n"
            "Or chat with the demo LLM through the OpenAI SDK (pip install openai), in Python:\n\n"
            f"{self._openai_snippet(key['key'])}\n"
        )

    def _openai_snippet(self, key: str) -> str:
        """One line of Python, ready to paste: the OpenAI SDK asking ``demo-chat``."""
        http = ""
        if self.settings.tls:
            http = f', http_client=httpx.Client(verify="{certs.cert_path(self.certs, "ca")}")'
        imports = "import httpx; from openai import OpenAI" if http else "from openai import OpenAI"
        return (
            f"{imports}; "
            f'client = OpenAI(base_url="{self._gateway_url()}/v1", api_key="{key}"{http}); '
            f'print(client.chat.completions.create(model="{DEMO_CHAT}", '
            'messages=[{"role": "user", "content": "Hi"}]).choices[0].message.content)'
        )

    # supervision -------------------------------------------------------------------------
    def supervise(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            if self.redis is not None and not self.redis.alive():
                log.error("embedded_redis_exited_restarting")
                self.redis.start()
                self._write_pids()
            for child in self.children:
                if child.alive() or self.stopping:
                    continue
                if child.next_start == 0.0:
                    code = child.process.returncode if child.process else None
                    if now - child.started_at > 60:
                        child.backoff_s = 0.5
                    child.next_start = now + child.backoff_s
                    child.backoff_s = min(child.backoff_s * 2, 30.0)
                    log.warning("process_exited", process=child.name, code=code, restart_in_s=child.next_start - now)
                elif now >= child.next_start:
                    child.next_start = 0.0
                    child.restarts += 1
                    child.start()
                    self._write_pids()
                    log.info("process_restarted", process=child.name, restarts=child.restarts)
            time.sleep(0.2)

    def stop(self, *_: object) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        self.stopping = True
        order = [
            [c for c in self.children if c.name.startswith("gateway")],
            [c for c in self.children if c.name.startswith("worker")],
            [c for c in self.children if c.name == "control"],
        ]
        for group in order:
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + 15 + self.settings.drain_s
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        for sock in self.sockets:
            sock.close()
        if self.redis is not None:
            self.redis.stop()
        if self.wrote_pids:  # a refused second start must not remove the running instance's file
            (self.settings.data_dir / "processes.json").unlink(missing_ok=True)
            (self.settings.data_dir / ENDPOINTS_FILE).unlink(missing_ok=True)


def run(settings: Settings) -> int:
    logs.configure(settings.log_level, "up")
    supervisor = Supervisor(settings)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, supervisor.stop)
    try:
        banner = supervisor.start()
        print(banner, flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        supervisor.supervise()
    except BastionError as exc:
        print(f"bastion up: {exc.detail}", file=sys.stderr, flush=True)
        return 2
    finally:
        supervisor.shutdown()
    print("Bastion stopped.", flush=True)
    return 0
