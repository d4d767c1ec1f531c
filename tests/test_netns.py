"""Bastion across network namespaces, mTLS on every hop (issue 16, Done-when 2).

Redis, PostgreSQL, the control plane, a gateway and a worker each run in their own network
namespace. veth pairs on point-to-point /30s exist only for the allowed paths - gateway-Redis,
worker-Redis, control-Redis, control-PostgreSQL - plus the test's own (root) namespace to the
gateway (ingress), the control plane (admin API), Redis and PostgreSQL (there the test plays an
attacker on those networks). No namespace forwards, so nothing two links away is reachable. Every
Bastion process runs with ``BASTION_REQUIRE_TLS=true``; each role has its own certificate naming
only its own addresses.

The test checks, in order: the full path (register the demo model over HTTPS with the admin
certificate, create a key, predict through the gateway, the decision in the control plane's log
on PostgreSQL); no listening socket in the worker's namespace (``ss``), Redis listening only on
its TLS port; nothing reaches the worker from the gateway's namespace, not even with a route a
compromised gateway could add; and the refusals below, every one counted and every one required.

Refusals, per server (each next to a positive control: the same client with the right
credentials is served, so a refusal is the server's or the client's decision, not a dead link):

- **Redis** (``tls-auth-clients yes``, a password): no client certificate; a certificate of a
  foreign CA; an expired certificate of the right CA; the wrong server identity - Redis 7 has no
  mapping from a client certificate to a user (any certificate of the CA is a client; the password
  is the second factor, so a valid certificate without it is refused too), so the meaningful
  name check is the client's: Bastion's own Redis options (``TLSFiles.redis_options``, host name
  checked) refuse the real Redis reached at an address its certificate does not name; a
  plaintext command to the TLS port.
- **Admin API** (``BASTION_ADMIN_CLIENT_CERTS=required``): no certificate, foreign CA, expired
  (each a refused handshake, or 401/403); a certificate of the right CA whose common name maps to
  no principal and no Bearer key (401); the client refuses the control plane's certificate when it
  expected another name (``sni_hostname`` "gateway": the name that client checks); plaintext HTTP.
- **PostgreSQL** (``hostssl ... cert clientcert=verify-full`` only): no certificate, foreign CA,
  expired; a certificate of the right CA whose common name is not the database user; libpq
  ``verify-full`` refuses the server reached at an address its certificate does not name;
  ``sslmode=disable`` (no pg_hba entry without TLS).
- **Gateway**: plaintext HTTP to its HTTPS port.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from bastion import demo
from bastion.adminclient import AdminClient
from bastion.embedded.redis_server import tls_binary
from bastion.redisconn import sync_client
from bastion.security import certs
from bastion.security.tls import TLSFiles
from tests import netns
from tests.support import breast_cancer

REDIS_PORT, PG_PORT, GATEWAY_PORT, ADMIN_PORT = 6379, 5432, 8000, 8001
READY_S = 45  # bounded, generous waits: a loaded CI machine
MISSING = netns.missing_requirements()
pytestmark = pytest.mark.skipif(bool(MISSING) and os.environ.get("CI") != "true", reason=f"needs {', '.join(MISSING)}")


@dataclass
class Attempt:
    server: str
    case: str
    refused: bool
    detail: str


@dataclass
class Cluster:
    net: netns.Topology
    procs: netns.Processes
    tls: Path
    foreign: Path
    expired: Path
    ip: dict[str, str]  # name -> address (see cluster())
    password: str
    admin_key: str
    timings: dict[str, float]  # seconds from the start of set-up to each step

    def files(self, directory: Path | None, role: str | None) -> TLSFiles:
        """A client's files: ``role``'s certificate from ``directory`` (None: none), our CA."""
        if directory is None or role is None:
            return TLSFiles(None, None, self.tls / "ca.pem")
        return TLSFiles(directory / f"{role}.pem", directory / f"{role}-key.pem", self.tls / "ca.pem")

    @property
    def control_url(self) -> str:
        return f"https://{self.ip['control']}:{ADMIN_PORT}"

    @property
    def gateway_url(self) -> str:
        return f"https://{self.ip['gateway']}:{GATEWAY_PORT}"


def _bastion_env(**own: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return {**env, "PYTHONUNBUFFERED": "1", **own}


def _https_ok(url: str, verify: ssl.SSLContext) -> bool:
    try:
        return httpx.get(url, verify=verify, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if MISSING:  # only in CI (the mark skips elsewhere): there a missing requirement fails
        pytest.fail(f"the network-namespace test needs {', '.join(MISSING)}")
    root = Path(tempfile.mkdtemp(prefix="bastion-netns-"))  # not under pytest's 0700 tmp: postgres reads it
    root.chmod(0o755)
    net = netns.Topology()
    procs = netns.Processes(root)
    try:
        yield _start(root, net, procs)
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop(["gateway", "worker", "control"])  # Bastion first, then the servers it uses
        procs.stop()
        stray = net.pids()  # anything still running in our namespaces is ours: kill it, then say so
        for pids in stray.values():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        net.close()
        shutil.rmtree(root, ignore_errors=True)
        assert stray == {}, f"processes outlived their stop: {stray}"
        assert netns.leftovers(net.tag) == []


def _start(root: Path, net: netns.Topology, procs: netns.Processes) -> Cluster:
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    for role in ("redis", "postgres", "control", "gateway", "worker"):
        net.add(role)
    ingress, admin, redis_root, pg_root = (net.link(None, r) for r in ("gateway", "control", "redis", "postgres"))
    gw_redis, worker_redis, control_redis = (net.link(r, "redis") for r in ("gateway", "worker", "control"))
    control_pg = net.link("control", "postgres")
    ip = {
        "gateway": ingress.b_ip,
        "control": admin.b_ip,
        "redis": redis_root.b_ip,  # Redis as the test (an attacker on its network) reaches it
        "postgres": pg_root.b_ip,
        "redis-alias": net.alias("redis", redis_root),  # the same servers, at an address not in their certificate
        "postgres-alias": net.alias("postgres", pg_root),
        "worker": worker_redis.a_ip,
        "redis-on-worker-link": worker_redis.b_ip,
        "redis-on-gateway-link": gw_redis.b_ip,
        "root-on-ingress": ingress.a_ip,
    }

    # certificates: each role's names only its own addresses; foreign CA; expired leaves of our CA
    tls, foreign, expired = root / "tls", root / "foreign", root / "expired"
    certs.init(tls)
    own = {
        "gateway": (ingress.b_ip,),
        "control": (admin.b_ip,),
        "redis": (redis_root.b_ip, gw_redis.b_ip, worker_redis.b_ip, control_redis.b_ip),
        "postgres": (pg_root.b_ip, control_pg.b_ip),
    }
    for role, hosts in own.items():
        certs.issue(tls, role, hosts)
    certs.init(foreign)
    expired.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy2(tls / name, expired / name)
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    for role in ("admin", "control", "gateway"):
        certs.issue(expired, role, days=1, not_before=long_ago)
    (expired / "ca-key.pem").unlink()

    # Redis: TLS only, client certificates, a password, bound to its addresses in its namespace
    password = secrets.token_urlsafe(24)
    conf = netns.redis_config(
        root / "redis",
        [redis_root.b_ip, gw_redis.b_ip, worker_redis.b_ip, control_redis.b_ip, ip["redis-alias"]],
        REDIS_PORT,
        password,
        tls / "redis.pem",
        tls / "redis-key.pem",
        tls / "ca.pem",
    )
    procs.start("redis", net.exec("redis", [tls_binary(), str(conf)]))
    timings["namespaces, certificates"] = time.monotonic() - t0

    # PostgreSQL: hostssl with certificate authentication only
    pg = netns.Postgres(
        root / "pg", listen=[pg_root.b_ip, control_pg.b_ip, ip["postgres-alias"]], clients=str(net.base)
    )
    pg.init(tls / "postgres.pem", tls / "postgres-key.pem", tls / "ca.pem")
    procs.start("postgres", net.exec("postgres", pg.command()))
    netns.wait_for(pg.ready, READY_S, "PostgreSQL", procs, "postgres")
    pg.create_owner()
    timings["postgres ready"] = time.monotonic() - t0

    def redis_up() -> bool:
        client = sync_client(
            f"rediss://:{password}@{redis_root.b_ip}:{REDIS_PORT}/0",
            TLSFiles(tls / "gateway.pem", tls / "gateway-key.pem", tls / "ca.pem"),
            socket_timeout=2,
            socket_connect_timeout=2,
        )
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    netns.wait_for(redis_up, READY_S, "Redis", procs, "redis")

    admin_key = secrets.token_urlsafe(32)
    ca = tls / "ca.pem"
    data = root / "data"
    # The shared artifact directory exists before any process starts, as a mounted volume would:
    # a confined worker can only be granted (Landlock) a directory that exists when it starts.
    (data / "artifacts").mkdir(parents=True)
    common = {
        "BASTION_REQUIRE_TLS": "true",
        "BASTION_TLS_CA": str(ca),
        "BASTION_DATA_DIR": str(data),
        "BASTION_ARTIFACT_DIR": str(data / "artifacts"),  # control writes, worker reads: a shared directory
        "BASTION_ADMIN_KEY": admin_key,
        "BASTION_LOG_LEVEL": "info",
        "BASTION_DRAIN_S": "0",  # the gateway stops at once (draining is tested on its own)
    }

    def role_env(role: str, redis_ip: str, **more: str) -> dict[str, str]:
        return _bastion_env(
            **common,
            BASTION_TLS_CERT=str(tls / f"{role}.pem"),
            BASTION_TLS_KEY=str(tls / f"{role}-key.pem"),
            BASTION_REDIS_URL=f"rediss://:{password}@{redis_ip}:{REDIS_PORT}/0",
            **more,
        )

    database_url = (
        f"postgresql://control@{control_pg.b_ip}:{PG_PORT}/bastion?sslmode=verify-full"
        f"&sslrootcert={ca}&sslcert={tls / 'control.pem'}&sslkey={tls / 'control-key.pem'}"
    )
    python = [sys.executable, "-m", "bastion"]
    procs.start(
        "control",
        net.exec("control", [*python, "control"]),
        role_env(
            "control",
            control_redis.b_ip,
            BASTION_DATABASE_URL=database_url,
            BASTION_CONTROL_HOST=admin.b_ip,
            BASTION_CONTROL_PORT=str(ADMIN_PORT),
            BASTION_ADMIN_CLIENT_CERTS="required",
            BASTION_ADMIN_CERT_PRINCIPALS="admin=admin",
        ),
    )
    # the gateway and the worker need only Redis: all three start at once (a loaded machine
    # spends its time importing Python, not waiting for one process after the other)
    procs.start(
        "gateway",
        net.exec("gateway", [*python, "gateway"]),
        role_env("gateway", gw_redis.b_ip, BASTION_HOST=ingress.b_ip, BASTION_GATEWAY_PORT=str(GATEWAY_PORT)),
    )
    procs.start("worker", net.exec("worker", [*python, "worker"]), role_env("worker", worker_redis.b_ip))
    cluster = Cluster(net, procs, tls, foreign, expired, ip, password, admin_key, timings)
    admin_ctx = cluster.files(tls, "admin").client_context()
    netns.wait_for(
        lambda: _https_ok(f"{cluster.control_url}/readyz", admin_ctx),
        READY_S,
        "the control plane",
        procs,
        "control",
        "gateway",
        "worker",
    )
    timings["control ready"] = time.monotonic() - t0
    netns.wait_for(
        lambda: _https_ok(f"{cluster.gateway_url}/readyz", cluster.files(None, None).client_context()),
        READY_S,
        "the gateway",
        procs,
        "gateway",
        "worker",
    )
    timings["gateway ready"] = time.monotonic() - t0
    return cluster


# the checks -----------------------------------------------------------------------------------
def _full_path(c: Cluster) -> str:
    """Register, key, predict over HTTPS; the decision reaches the control plane's log."""
    admin = AdminClient(c.control_url, c.admin_key, verify=c.files(c.tls, "admin").client_context())
    try:
        version = admin.register(demo.MODEL_NAME, demo.model_bytes())
        key = admin.create_key("acme", "netns")["key"]
        request = orjson.loads(demo.sample_request())
        answer: dict[str, Any] = {}

        def predicted() -> bool:
            r = httpx.post(
                f"{c.gateway_url}/v1/models/{demo.MODEL_NAME}/predict",
                json=request,
                headers={"Authorization": f"Bearer {key}"},
                verify=c.files(None, None).client_context(),
                timeout=10,
            )
            answer.update(status=r.status_code, body=r.json() if r.status_code == 200 else r.text)
            return r.status_code == 200

        netns.wait_for(predicted, READY_S, "a prediction through the gateway", c.procs, "gateway", "worker", "control")
        body = answer["body"]
        assert body["model"] == demo.MODEL_NAME, body
        assert body["version"] == version["version"], body
        features, labels = breast_cancer()  # the sample is the data set's first row: its label is known
        assert request["inputs"][0] == pytest.approx(features[0].tolist(), rel=1e-6)
        assert body["outputs"]["label"] == [int(labels[0])], body
        models = {m["name"]: m for m in admin.models()}
        assert demo.MODEL_NAME in models
        logged: dict[str, Any] = {}

        def in_log() -> bool:
            try:
                logged.update(admin.audit_event(body["id"]))
            except Exception:  # not logged yet (404)
                return False
            return True

        netns.wait_for(in_log, READY_S, "the decision in the control plane's log", c.procs, "control")
        assert logged["event"]["id"] == body["id"]
        return (
            f"predict -> {body.get('outputs', body)!s:.80} (id {body['id']}, decision logged at {logged['position']})"
        )
    finally:
        admin.close()


def _listening(c: Cluster, role: str) -> list[str]:
    result = c.net.run(role, ["ss", "-Hltnux"])
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line.strip()]


PROBE = textwrap.dedent(
    """
    import socket, sys, threading
    timeout, targets, results = float(sys.argv[1]), sys.argv[2:], {}
    def probe(target):
        host, port = target.rsplit(":", 1)
        s = socket.socket()
        s.settimeout(timeout)
        try:
            s.connect((host, int(port)))
            results[target] = "CONNECTED"
        except OSError as exc:
            results[target] = f"{type(exc).__name__} {exc.errno}"
        finally:
            s.close()
    threads = [threading.Thread(target=probe, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for target in targets:
        print(target, results[target])
    """
)


def _probe(c: Cluster, role: str, targets: list[str], timeout_s: float) -> dict[str, str]:
    """``role``'s namespace connects to each ``host:port``: what happened to each."""
    result = c.net.run(role, [sys.executable, "-c", PROBE, str(timeout_s), *targets], timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


# What a refusal looks like to a client: a TLS alert or a closed connection, an authentication
# error, an HTTP 401/403. Anything else (a TypeError in the test, say) is a bug, not a refusal.
REFUSALS = (redis.exceptions.RedisError, httpx.TransportError, psycopg.Error, ssl.SSLError, OSError)


def _reason(exc: BaseException) -> str:
    """The telling part of a client's error: libpq's after its last "failed:", else the first line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, psycopg.Error) and "failed: " in text:
        text = text.rsplit("failed: ", 1)[1]
    return f"{type(exc).__name__}: {text}"


def _attempt(
    server: str, case: str, action: Callable[[], Any], expect: str = "", served: Callable[[Any], bool] = lambda _r: True
) -> Attempt:
    """Run ``action``: refused if it raises a client error (or its result is not ``served``) whose
    description matches ``expect`` (a regular expression; empty: any refusal), so that each case
    is refused for its own reason and not, say, for a dead link."""
    try:
        result = action()
    except REFUSALS as exc:
        detail = _reason(exc)
        if expect and not re.search(expect, detail, re.IGNORECASE):
            return Attempt(server, case, False, f"refused for another reason: {detail}")
        return Attempt(server, case, True, detail)
    if served(result):
        return Attempt(server, case, False, f"ACCEPTED: {result!s:.60}")
    detail = f"answered {result!s:.60}"
    return Attempt(server, case, not expect or bool(re.search(expect, detail, re.IGNORECASE)), detail)


def _redis_cases(c: Cluster) -> tuple[list[Attempt], list[str]]:
    url = f"rediss://:{c.password}@{c.ip['redis']}:{REDIS_PORT}/0"
    alias = f"rediss://:{c.password}@{c.ip['redis-alias']}:{REDIS_PORT}/0"

    def ping(u: str, files: TLSFiles, **options: Any) -> Callable[[], Any]:
        def go() -> Any:
            client = sync_client(u, files, socket_timeout=5, socket_connect_timeout=5, **options)
            try:
                return client.ping()
            finally:
                client.close()

        return go

    controls = [f"redis: gateway cert, password -> PING {ping(url, c.files(c.tls, 'gateway'))()}"]
    handshake = "ssl|eof|reset|certificate|alert|closed"  # a TLS refusal, as the client sees it
    cases = [
        ("no client certificate", ping(url, c.files(None, None)), handshake),
        ("foreign CA", ping(url, c.files(c.foreign, "gateway")), handshake),
        ("expired certificate", ping(url, c.files(c.expired, "gateway")), handshake),
        ("valid certificate, no password", ping(url.replace(f":{c.password}@", ""), c.files(c.tls, "gateway")), "auth"),
        ("server not named in its certificate", ping(alias, c.files(c.tls, "gateway")), "mismatch|not valid for"),
        ("plaintext to the TLS port", ping(url.replace("rediss://", "redis://"), TLSFiles()), "reset|closed|eof"),
    ]
    return [_attempt("redis", case, go, expect) for case, go, expect in cases], controls


def _admin_cases(c: Cluster) -> tuple[list[Attempt], list[str]]:
    url = f"{c.control_url}/admin/v1/models"

    def handshake_then_get(files: TLSFiles) -> Callable[[], str]:
        """A raw TLS client (``ssl``, the same context): under TLS 1.3 a refused client certificate
        arrives as an alert after the client's handshake, on the first read, which httpx reports
        only as a closed connection; this shows the alert itself."""

        def go() -> str:
            host = c.ip["control"]
            with (
                socket.create_connection((host, ADMIN_PORT), timeout=5) as raw,
                files.client_context().wrap_socket(raw, server_hostname=host) as tls,
            ):
                tls.sendall(f"GET /admin/v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                head = tls.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                if not head:
                    raise ConnectionError("closed without an answer")
                return head

        return go

    def get(files: TLSFiles, target: str = url, **kwargs: Any) -> Callable[[], httpx.Response]:
        def go() -> httpx.Response:
            verify = files.client_context() if target.startswith("https") else False
            with httpx.Client(verify=verify, timeout=5) as client:
                return client.get(target, **kwargs)

        return go

    control = get(c.files(c.tls, "admin"))()
    assert control.status_code == 200, control.text
    controls = [f"admin API: admin cert (CN mapped), no Bearer -> {control.status_code}"]
    served = lambda r: r.status_code < 400  # noqa: E731 - 401/403 are refusals
    tls_served = lambda head: " 200 " in f"{head} "  # noqa: E731
    # The admin API's TLS stack closes a refused handshake without sending the alert: the client
    # sees the connection closed with no answer (its own certificate would have got 200 above).
    refused = "closed without an answer|certificate required|unknown ca|certificate expired|alert"
    cases: list[tuple[str, Callable[[], Any], str]] = [
        ("no client certificate", handshake_then_get(c.files(None, None)), refused),
        ("foreign CA", handshake_then_get(c.files(c.foreign, "admin")), refused),
        ("expired certificate", handshake_then_get(c.files(c.expired, "admin")), refused),
        ("CN not mapped, no Bearer key", get(c.files(c.tls, "gateway")), "401|403"),
        (
            "server not named in its certificate",
            get(c.files(c.tls, "admin"), extensions={"sni_hostname": "gateway"}),
            "certificate_verify_failed|mismatch",
        ),
        ("plaintext HTTP", get(TLSFiles(), url.replace("https://", "http://")), "disconnected|reset|closed|400"),
    ]
    attempts = [_attempt("admin API", case, go, expect, tls_served) for case, go, expect in cases[:3]]
    attempts += [_attempt("admin API", case, go, expect, served) for case, go, expect in cases[3:]]
    return attempts, controls


def _gateway_cases(c: Cluster) -> list[Attempt]:
    def plain() -> httpx.Response:
        return httpx.get(c.gateway_url.replace("https://", "http://") + "/healthz", timeout=5)

    return [
        _attempt("gateway", "plaintext HTTP", plain, "disconnected|reset|closed|400", lambda r: r.status_code < 400)
    ]


def _pg_cases(c: Cluster) -> tuple[list[Attempt], list[str]]:
    ca = c.tls / "ca.pem"

    def connect(
        directory: Path | None, role: str | None, host: str | None = None, sslmode: str = "verify-full"
    ) -> Callable[[], Any]:
        params: dict[str, Any] = {"sslmode": sslmode, "sslrootcert": str(ca)}
        if directory is not None and role is not None:
            params.update(sslcert=str(directory / f"{role}.pem"), sslkey=str(directory / f"{role}-key.pem"))
        else:  # no certificate at all: not even ~/.postgresql/postgresql.crt
            params.update(sslcert="/nonexistent", sslkey="/nonexistent")

        def go() -> Any:
            with psycopg.connect(
                host=host or c.ip["postgres"],
                port=PG_PORT,
                user="control",
                dbname="bastion",
                connect_timeout=5,
                **params,
            ) as conn:
                return conn.execute("SELECT current_user").fetchone()

        return go

    controls = [f"postgres: control cert -> {connect(c.tls, 'control')()}"]
    handshake = "ssl|certificate|alert|eof|closed"
    cases = [
        ("no client certificate", connect(None, None), "certificate"),
        ("foreign CA", connect(c.foreign, "control"), handshake),
        ("expired certificate", connect(c.expired, "control"), handshake),
        ("CN is not the database user", connect(c.tls, "gateway"), "certificate authentication failed"),
        (
            "server not named in its certificate",
            connect(c.tls, "control", host=c.ip["postgres-alias"]),
            "does not match",
        ),
        ("sslmode=disable", connect(c.tls, "control", sslmode="disable"), "no pg_hba.conf entry.*no encryption"),
    ]
    return [_attempt("postgres", case, go, expect) for case, go, expect in cases], controls


def test_bastion_across_namespaces_serves_with_mtls_and_refuses_every_other_connection(cluster: Cluster) -> None:
    try:
        _check(cluster)
    except BaseException:
        print(cluster.procs.tails())
        raise


def _check(c: Cluster) -> None:
    started = time.monotonic()
    print()
    print("set-up:", ", ".join(f"{step} {t:.1f} s" for step, t in c.timings.items()))
    print(f"full path: {_full_path(c)}")

    # the worker listens on nothing; Redis only on its TLS port
    listening = {role: _listening(c, role) for role in ("worker", "gateway", "control", "redis", "postgres")}
    print("listening sockets (ss -ltnux in each namespace):")
    for role, lines in listening.items():
        shown = sorted({f"{line.split()[0]} {line.split()[4]}" for line in lines}) or ["none"]
        print(f"  {role:9} {', '.join(shown)}")
    assert listening["worker"] == [], listening["worker"]
    assert {line.split()[4] for line in listening["gateway"]} == {f"{c.ip['gateway']}:{GATEWAY_PORT}"}, listening
    assert {line.split()[4] for line in listening["control"]} == {f"{c.ip['control']}:{ADMIN_PORT}"}, listening
    assert {line.split()[4].rsplit(":", 1)[1] for line in listening["redis"]} == {str(REDIS_PORT)}, listening

    # nothing reaches the worker from the gateway's namespace
    ports = (REDIS_PORT, GATEWAY_PORT, ADMIN_PORT, 22, 80, 443, 9100, 9102)
    targets = [f"{host}:{p}" for host in (c.ip["worker"], c.ip["redis-on-worker-link"]) for p in ports]
    no_route = _probe(c, "gateway", targets, 2.0)
    assert all(r == f"OSError {errno.ENETUNREACH}" for r in no_route.values()), no_route  # no route at all
    route = c.net.run("gateway", ["ip", "route", "get", c.ip["worker"]])
    assert route.returncode != 0, route.stdout  # no route at all
    # even a compromised gateway that adds routes gets nowhere: neither Redis's namespace nor the
    # root end of the ingress link forwards (to the worker, the control plane, PostgreSQL)
    routes = {
        c.ip["worker"]: c.ip["redis-on-gateway-link"],
        c.ip["control"]: c.ip["root-on-ingress"],
        c.ip["postgres"]: c.ip["root-on-ingress"],
    }
    for target, via in routes.items():
        added = c.net.run("gateway", ["ip", "route", "add", f"{target}/32", "via", via])
        assert added.returncode == 0, added.stderr
    routed = [f"{c.ip['worker']}:{REDIS_PORT}", f"{c.ip['control']}:{ADMIN_PORT}", f"{c.ip['postgres']}:{PG_PORT}"]
    forwarded = _probe(c, "gateway", routed, 2.0)
    assert all(not r.startswith("CONNECTED") for r in forwarded.values()), forwarded
    unreachable = {**no_route, **{f"{k} (routed)": v for k, v in forwarded.items()}}

    redis_attempts, redis_controls = _redis_cases(c)
    admin_attempts, admin_controls = _admin_cases(c)
    pg_attempts, pg_controls = _pg_cases(c)
    attempts = redis_attempts + admin_attempts + pg_attempts + _gateway_cases(c)

    # the servers' side of the refusals: what Redis (verbose) and PostgreSQL logged
    redis_log = (c.procs.logs / "redis.log").read_text(errors="replace")
    pg_log = (c.procs.logs / "postgres.log").read_text(errors="replace")
    print("Redis logged:", sorted(set(re.findall(r"Error accepting a client connection: (.*)", redis_log))))
    print(
        "PostgreSQL logged:",
        sorted(
            set(
                re.findall(
                    r"(?:FATAL|LOG):  ((?:could not accept|no pg_hba|certificate|connection requires).*)", pg_log
                )
            )
        ),
    )
    print("positive controls:")
    for line in redis_controls + admin_controls + pg_controls:
        print(f"  {line}")
    print(f"gateway namespace -> worker: {len(unreachable)} connection attempts, none connected")
    for target, result in unreachable.items():
        print(f"  {target:32} {result}")
    print(f"{'server':10} {'case':38} {'result':8} detail")
    for a in attempts:
        print(f"{a.server:10} {a.case:38} {'refused' if a.refused else 'ACCEPTED':8} {a.detail}")
    summary: dict[str, list[int]] = {}
    for a in attempts:
        summary.setdefault(a.server, [0, 0])
        summary[a.server][0] += 1
        summary[a.server][1] += a.refused
    print(f"{'server':10} {'attempts':>8} {'refused':>8}")
    for server, (n, refused) in summary.items():
        print(f"{server:10} {n:8} {refused:8}")
    total, refused_total = len(attempts), sum(a.refused for a in attempts)
    print(f"{'all':10} {total:8} {refused_total:8}   ({time.monotonic() - started:.1f} s of checks)")
    for name in ("redis", "postgres", "control", "gateway", "worker"):
        assert c.procs.alive(name), f"{name} exited\n{c.procs.tails()}"
    assert refused_total == total, [a for a in attempts if not a.refused]
