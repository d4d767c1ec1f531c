"""Network namespaces for tests: one namespace per process, veth pairs only where a path is allowed.

``Topology`` makes namespaces named ``bst-<6 hex>-<role>`` (unique per run), each with ``lo`` up
and IPv4 forwarding off, and ``link(a, b)`` joins two of them (``None`` is the test's own, root,
namespace) with a veth pair on a point-to-point /30. No other route is added: a namespace reaches
only the addresses of its own links, and because no namespace forwards, a namespace two links
away is unreachable even if a route to it were added (the root namespace may forward for others,
so forwarding is turned off on the root end of each of our veths). ``close()`` deletes every namespace (which
deletes their veths) and is safe to call twice.

``Servers`` starts the real Redis (Debian's ``redis-server``, built with TLS) and PostgreSQL inside
a namespace, configured for TLS with client certificates only; nothing here is a stand-in.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bastion.embedded.redis_server import tls_binary

PG_ROOT = Path("/usr/lib/postgresql")


def missing_requirements() -> list[str]:
    """What this machine lacks to run a namespace test (empty when everything is there)."""
    found = []
    if os.geteuid() != 0:
        found.append("root (ip netns)")
    for tool in ("ip", "ss", "sysctl", "setpriv"):
        if shutil.which(tool) is None:
            found.append(f"the {tool} command")
    try:
        tls_binary()
    except Exception:  # Unavailable
        found.append("a redis-server built with TLS")
    if pg_bin() is None:
        found.append(f"PostgreSQL server binaries under {PG_ROOT}")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        found.append("a postgres user")
    return found


def pg_bin() -> Path | None:
    """The newest PostgreSQL's bin directory (``initdb``, ``postgres``), or None."""
    versions = sorted(
        PG_ROOT.glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
    )
    return versions[-1].parent if versions else None


def _run(*argv: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class Link:
    """One veth pair: ``a`` and ``b`` are the namespaces (None: root), ``a_ip``/``b_ip`` their addresses."""

    a: str | None
    b: str | None
    a_ip: str
    b_ip: str
    a_dev: str
    b_dev: str


@dataclass
class Topology:
    """Namespaces joined by veth pairs (see the module docstring)."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: dict[str, str] = field(default_factory=dict)  # role -> namespace name
    links: list[Link] = field(default_factory=list)
    aliases: list[tuple[str, str, str]] = field(default_factory=list)  # (role, address, root-side device)

    def __post_init__(self) -> None:
        self.base = self._free_base()

    @staticmethod
    def _free_base() -> ipaddress.IPv4Network:
        """A 10.x.y.0/24 no address or route of the root namespace is in (links are /30s of it)."""
        used = _run("ip", "-4", "-o", "addr", "show").stdout + _run("ip", "-4", "route", "show", "table", "all").stdout
        for _ in range(200):
            net = ipaddress.IPv4Network(f"10.{random.randint(64, 250)}.{random.randint(0, 255)}.0/24")
            prefix = ".".join(str(net.network_address).split(".")[:3]) + "."
            if prefix not in used:
                return net
        raise RuntimeError("no free 10.x.y.0/24 for the test's links")

    def name(self, role: str) -> str:
        return self.namespaces[role]

    def add(self, role: str) -> str:
        """A namespace for ``role`` with ``lo`` up and forwarding off."""
        ns = f"bst-{self.tag}-{role}"
        _run("ip", "netns", "add", ns)
        self.namespaces[role] = ns
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=0")
        forwarding = _run("ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()
        if forwarding != "0":
            raise RuntimeError(f"namespace {ns} forwards (ip_forward={forwarding})")
        return ns

    def link(self, a: str | None, b: str | None) -> Link:
        """A veth pair between roles ``a`` and ``b`` (None: the root namespace) on the next /30."""
        index = len(self.links)
        subnet = list(self.base.subnets(new_prefix=30))[index]
        a_ip, b_ip = (str(h) for h in subnet.hosts())
        a_dev, b_dev = f"b{self.tag}{index}a", f"b{self.tag}{index}b"
        _run("ip", "link", "add", a_dev, "type", "veth", "peer", "name", b_dev)
        for dev, role, ip in ((a_dev, a, a_ip), (b_dev, b, b_ip)):
            prefix: tuple[str, ...] = ()
            if role is not None:
                _run("ip", "link", "set", dev, "netns", self.name(role))
                prefix = ("-n", self.name(role))
            _run("ip", *prefix, "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", *prefix, "link", "set", dev, "up")
            if role is None:  # the root namespace may forward for others: never what arrives on ours
                _run("sysctl", "-qw", f"net.ipv4.conf.{dev}.forwarding=0")
        link = Link(a, b, a_ip, b_ip, a_dev, b_dev)
        self.links.append(link)
        return link

    def alias(self, role: str, root_link: Link) -> str:
        """A second address (/32) on ``role``'s end of its link to the root namespace, routed from
        root: the same server, reached at an address its certificate does not name."""
        index = 200 + len(self.aliases)
        address = str(self.base.network_address + index)
        _run("ip", "-n", self.name(role), "addr", "add", f"{address}/32", "dev", root_link.b_dev)
        _run("ip", "route", "add", f"{address}/32", "dev", root_link.a_dev)
        self.aliases.append((role, address, root_link.a_dev))
        return address

    def exec(self, role: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.name(role), *argv]

    def run(self, role: str, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec(role, argv), capture_output=True, text=True, timeout=timeout, check=False)

    def pids(self) -> dict[str, list[int]]:
        """The processes still running in each namespace (by role)."""
        found = {}
        for role, ns in self.namespaces.items():
            out = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            if out:
                found[role] = [int(p) for p in out]
        return found

    def close(self) -> None:
        for _role, address, dev in self.aliases:
            _run("ip", "route", "del", f"{address}/32", "dev", dev, check=False)
        for ns in self.namespaces.values():
            _run("ip", "netns", "del", ns, check=False)
        for link in self.links:  # a pair with both ends in root (none today) outlives the namespaces
            _run("ip", "link", "del", link.a_dev, check=False)
        self.namespaces.clear()
        self.aliases.clear()


def leftovers(tag: str) -> list[str]:
    """Namespaces or root-side devices of run ``tag`` still there (empty after ``close``)."""
    names = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line.strip()]
    devs = _run("ip", "-o", "link", "show").stdout
    return [n for n in names if n.startswith(f"bst-{tag}-")] + ([f"veth b{tag}*"] if f"b{tag}" in devs else [])


@dataclass
class Processes:
    """Child processes started in namespaces, each in its own process group, stopped by ``stop``."""

    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                list(argv), env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self.procs[name] = proc
        return proc

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop(self, names: Sequence[str] | None = None, grace_s: float = 10) -> None:
        """SIGTERM to each process group of ``names`` (all: None), SIGKILL after ``grace_s``, and
        SIGKILL to whatever they forked and left in their groups."""
        procs = [p for n, p in self.procs.items() if names is None or n in names]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for proc in procs:  # what a process forked and left behind in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def tails(self, lines: int = 30) -> str:
        parts = []
        for name in self.procs:
            path = self.logs / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name}.log (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, procs: Processes, *names: str) -> None:
    """Until ``predicate()``; fails at once if one of ``names`` exits first (the caller prints the logs)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        for name in names:
            if not procs.alive(name):
                raise AssertionError(f"{name} exited ({procs.procs[name].returncode}) waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


# servers --------------------------------------------------------------------------------------
def redis_config(
    directory: Path, binds: Sequence[str], port: int, password: str, cert: Path, key: Path, ca: Path
) -> Path:
    """A Redis config: TLS only (``port 0``), on ``binds``, client certificates from ``ca``
    required, a password, no persistence."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "redis.conf"
    conf.write_text(
        "\n".join(
            [
                f"bind {' '.join(binds)}",
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {cert}",
                f"tls-key-file {key}",
                f"tls-ca-cert-file {ca}",
                "tls-auth-clients yes",
                f"requirepass {password}",
                "protected-mode yes",
                f"dir {directory}",
                'save ""',
                "appendonly no",
                "daemonize no",
                "loglevel verbose",  # a refused handshake is logged at verbose, with its reason
                "",
            ]
        )
    )
    conf.chmod(0o600)
    return conf


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``root`` (owned by the postgres user): TLS with client certificates
    only (``hostssl ... cert``) for ``user`` on ``database``, plus trust on its private socket
    for set-up by the postgres user."""

    root: Path
    listen: Sequence[str]
    clients: str  # the network the hostssl line admits, e.g. 10.1.2.0/24
    user: str = "control"
    database: str = "bastion"
    port: int = 5432

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def init(self, cert: Path, key: Path, ca: Path) -> None:
        bin_dir = pg_bin()
        assert bin_dir is not None
        owner = pwd.getpwnam("postgres")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.socket_dir.mkdir()
        os.chown(self.socket_dir, owner.pw_uid, owner.pw_gid)
        result = subprocess.run(
            [
                *as_postgres(),
                str(bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "reject",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")
        for src, name, mode in ((cert, "server.crt", 0o644), (key, "server.key", 0o600), (ca, "root.crt", 0o644)):
            target = self.data / name
            shutil.copyfile(src, target)
            os.chown(target, owner.pw_uid, owner.pw_gid)
            target.chmod(mode)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n".join(
                    [
                        "",
                        f"listen_addresses = '{','.join(self.listen)}'",
                        f"port = {self.port}",
                        f"unix_socket_directories = '{self.socket_dir}'",
                        "ssl = on",
                        "ssl_cert_file = 'server.crt'",
                        "ssl_key_file = 'server.key'",
                        "ssl_ca_file = 'root.crt'",
                        "ssl_min_protocol_version = 'TLSv1.2'",
                        "fsync = off",
                        "synchronous_commit = off",
                        "full_page_writes = off",
                        "max_connections = 40",
                        "shared_buffers = 16MB",
                        "log_connections = on",
                        "",
                    ]
                )
            )
        (self.data / "pg_hba.conf").write_text(
            "# TYPE  DATABASE  USER  ADDRESS  METHOD\n"
            "local   all       postgres         trust\n"
            f"hostssl {self.database} {self.user} {self.clients} cert clientcert=verify-full\n"
        )

    def command(self) -> list[str]:
        bin_dir = pg_bin()
        assert bin_dir is not None
        return [*as_postgres(), str(bin_dir / "postgres"), "-D", str(self.data)]

    def ready(self) -> bool:
        return any(self.socket_dir.glob(".s.PGSQL.*.lock")) and self._local_ok()

    def _local_ok(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres", connect_timeout=2
            ):
                return True
        except psycopg.Error:
            return False

    def create_owner(self) -> None:
        """The role ``user`` (no password: it logs in by certificate) and its database."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE ROLE "{self.user}" LOGIN')
            conn.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')


def as_postgres() -> list[str]:
    """Prefix that runs a command as the postgres user (``setpriv`` execs: the pid stays the server's)."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--reset-env"]
