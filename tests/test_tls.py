"""TLS on every hop: certificates, ``bastion up --tls``, reload on SIGHUP without a dropped
request, admin mTLS mapped to a principal, TLS on the gRPC port, and ``--require-tls``."""

from __future__ import annotations

import datetime
import os
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import redis
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bastion import demo
from bastion.embedded.redis_server import free_port, tls_binary
from bastion.errors import Unavailable
from bastion.gateway.grpc import inference_pb2 as pb
from bastion.security import certs
from bastion.security.tls import TLSFiles
from tests.support import Stack, Up, running, wait_until

ROW = [0.1] * 30

try:
    tls_binary()
    HAVE_TLS_REDIS = True
except Unavailable:
    HAVE_TLS_REDIS = False
# CI and this project's machines have Debian's redis-server (built with TLS); elsewhere say why.
needs_tls_redis = pytest.mark.skipif(
    not HAVE_TLS_REDIS and os.environ.get("CI") != "true", reason="no redis-server built with TLS on the PATH"
)


def _serial(host: str, port: int, ca: Path) -> int:
    """The serial number of the certificate a TLS server presents now (a fresh handshake)."""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# certificates -----------------------------------------------------------------------------
def test_init_writes_a_ca_and_a_certificate_per_role_with_the_right_names_and_uses(tmp_path: Path) -> None:
    issued = certs.init(tmp_path, ("bastion.example.com", "10.0.0.7"), days=3)
    assert [i.role for i in issued] == ["ca", *certs.ROLES]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for role in certs.ROLES:
        cert = x509.load_pem_x509_certificate((tmp_path / f"{role}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert set(sans.get_values_for_type(x509.DNSName)) == {role, "localhost", "bastion.example.com"}
        assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.7"}
        uses = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        expected = {ExtendedKeyUsageOID.CLIENT_AUTH}
        if role != "admin":  # the operator's certificate only connects
            expected.add(ExtendedKeyUsageOID.SERVER_AUTH)
        assert set(uses) == expected
        lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=2, hours=23) < lifetime <= datetime.timedelta(days=3)
        assert (tmp_path / f"{role}-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600


def test_rotate_reissues_every_role_under_the_same_ca_and_init_keeps_an_existing_ca(tmp_path: Path) -> None:
    certs.init(tmp_path)
    before = {r: x509.load_pem_x509_certificate((tmp_path / f"{r}.pem").read_bytes()) for r in certs.ROLES}
    ca_before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError):
        certs.init(tmp_path)
    certs.rotate(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    for role in certs.ROLES:
        after = x509.load_pem_x509_certificate((tmp_path / f"{role}.pem").read_bytes())
        assert after.serial_number != before[role].serial_number
        assert after.public_key() != before[role].public_key()
        after.verify_directly_issued_by(ca)
    with pytest.raises(FileNotFoundError):
        certs.rotate(tmp_path / "elsewhere")


def test_the_cli_makes_and_rotates_certificates(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bastion", "certs", *args], capture_output=True, text=True, timeout=60
        )

    made = cli("init", "--dir", str(tmp_path), "--json")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "gateway.pem").exists()
    again = cli("init", "--dir", str(tmp_path))
    assert again.returncode == 1 and "use rotate" in again.stderr
    assert cli("rotate", "--dir", str(tmp_path)).returncode == 0


# bastion up --tls -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def up_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    extra = ["--tls", "--workers", "1", "--gateways", "1"]
    instance = Up(tmp_path_factory.mktemp("uptls"), free_port(), free_port(), extra=extra)
    try:
        instance.read_banner()
        yield instance
    finally:
        instance.stop()


@needs_tls_redis
def test_up_tls_prints_a_curl_with_cacert_that_answers_over_https(up_tls: Up) -> None:
    start = up_tls.out.index("curl -s")
    command = shlex.split(up_tls.out[start:].split("\n\n")[0].replace("\\\n", " "))
    assert "--cacert" in command and command[command.index("--cacert") + 1] == str(up_tls.data_dir / "tls/ca.pem")
    assert any(a.startswith("https://") for a in command)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)  # the real curl, as printed
    assert done.returncode == 0, done.stderr
    assert '"label":[0]' in done.stdout.replace(" ", "")
    assert "TLS on every hop" in up_tls.out


@needs_tls_redis
def test_up_tls_refuses_plaintext_on_the_gateway_admin_and_redis_ports(up_tls: Up) -> None:
    for port in (up_tls.gateway_port, up_tls.control_port):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    conf = (up_tls.data_dir / "redis/redis.conf").read_text()
    assert "port 0\n" in conf and "tls-auth-clients yes" in conf
    tls_port = int(conf.split("tls-port ")[1].split()[0])
    password = conf.split("requirepass ")[1].split()[0]
    plain = redis.Redis(host="127.0.0.1", port=tls_port, password=password, socket_timeout=3)
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        plain.ping()
    no_cert = redis.Redis(
        host="127.0.0.1",
        port=tls_port,
        password=password,
        ssl=True,
        ssl_ca_certs=str(up_tls.data_dir / "tls/ca.pem"),
        socket_timeout=3,
    )
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        no_cert.ping()


@needs_tls_redis
def test_up_tls_every_process_holds_its_own_role_certificate_and_a_rediss_url(up_tls: Up) -> None:
    import json

    pids = json.loads((up_tls.data_dir / "processes.json").read_text())
    for name, role in (("control", "control"), ("gateway-0", "gateway"), ("worker-0", "worker")):
        env = dict(
            item.split("=", 1) for item in Path(f"/proc/{pids[name]}/environ").read_text().split("\0") if "=" in item
        )
        assert env["BASTION_REDIS_URL"].startswith("rediss://"), name
        assert env["BASTION_TLS_CERT"].endswith(f"tls/{role}.pem"), name
    listing = subprocess.run(
        [sys.executable, "-m", "bastion", "models", "list", "--data-dir", str(up_tls.data_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr  # the CLI verifies the admin API with the CA
    assert demo.MODEL_NAME in listing.stdout


@needs_tls_redis
def test_up_tls_admin_api_on_its_inherited_socket_times_out_an_unfinished_handshake(up_tls: Up) -> None:
    """bastion up hands the admin API its listening socket: the handshake timeout holds there too."""
    with socket.create_connection(("127.0.0.1", up_tls.control_port), timeout=30) as raw:
        started = time.monotonic()
        raw.sendall(b"\x16\x03\x01")
        try:
            assert raw.recv(1024) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - started
    assert 8.0 < waited < 14.0, waited  # header_timeout_s is 10 by default (uvloop's own would be 60)


# a secure stack: reload, mTLS, gRPC --------------------------------------------------------
@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not HAVE_TLS_REDIS and os.environ.get("CI") != "true":
        pytest.skip("no redis-server built with TLS on the PATH")
    with running(
        tmp_path_factory.mktemp("secure"),
        secure=True,
        workers=1,
        grpc_port=free_port(),
        admin_client_certs="optional",
        admin_cert_principals="admin=admin,auditor=audit",
        header_timeout_s=3,
    ) as stack:
        yield stack


def test_a_certificate_rotated_and_reloaded_on_sighup_drops_no_request(secure: Stack) -> None:
    port = int(secure.gateway.rsplit(":", 1)[1])
    ca = secure.certs / "ca.pem"
    before = _serial("127.0.0.1", port, ca)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        with secure.client() as http:  # one keep-alive connection, across the reload
            while not stop.is_set():
                r = http.post(f"/v1/models/{demo.MODEL_NAME}/predict", json={"inputs": [ROW]})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:100]}")
                answered[0] += 1

    def fresh_connections() -> None:
        while not stop.is_set():
            try:
                with secure.client() as http:
                    if http.get("/healthz").status_code != 200:
                        failures.append("healthz")
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)

    threads = [threading.Thread(target=load), threading.Thread(target=fresh_connections)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        certs.rotate(secure.certs)
        secure.signal("gateway-0", signal.SIGHUP)
        wait_until(lambda: _serial("127.0.0.1", port, ca) != before, 10, "the gateway to present the new certificate")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert answered[0] > 10
    assert secure.procs["gateway-0"].poll() is None  # SIGHUP reloaded, it did not stop the gateway
    new = x509.load_pem_x509_certificate((secure.certs / "gateway.pem").read_bytes()).serial_number
    assert _serial("127.0.0.1", port, ca) == new


def test_the_admin_api_maps_a_client_certificate_to_its_principal(secure: Stack) -> None:
    tls_dir = secure.certs
    url = f"{secure.control_url}/admin/v1/models"

    def context(role: str | None) -> ssl.SSLContext:
        cert = (tls_dir / f"{role}.pem", tls_dir / f"{role}-key.pem") if role else (None, None)
        return TLSFiles(cert[0], cert[1], tls_dir / "ca.pem").client_context()

    assert httpx.get(url, verify=context("admin"), timeout=10).status_code == 200  # no Bearer: the cert
    assert httpx.get(url, verify=context(None), timeout=10).status_code == 401  # no cert, no key
    assert httpx.get(url, verify=context("gateway"), timeout=10).status_code == 401  # a CN not mapped
    bearer = {"Authorization": f"Bearer {secure.admin_key}"}
    assert httpx.get(url, verify=context(None), headers=bearer, timeout=10).status_code == 200
    # the auditor's certificate holds "audit" only: keys need "keys"
    certs.issue(tls_dir, "auditor-role", name="auditor")
    auditor = TLSFiles(tls_dir / "auditor.pem", tls_dir / "auditor-key.pem", tls_dir / "ca.pem").client_context()
    assert httpx.get(f"{secure.control_url}/admin/v1/keys", verify=auditor, timeout=10).status_code == 403
    # a certificate from another CA is refused in the handshake
    foreign = tls_dir.parent / "foreign"
    certs.init(foreign)
    stranger = TLSFiles(foreign / "admin.pem", foreign / "admin-key.pem", tls_dir / "ca.pem").client_context()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=stranger, timeout=10)


def test_grpc_serves_over_tls_and_refuses_plaintext(secure: Stack) -> None:
    port = secure.settings.grpc_port
    ca = (secure.certs / "ca.pem").read_bytes()
    metadata = [("authorization", f"Bearer {secure.keys['acme']}")]

    def live(channel: grpc.Channel) -> bool:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        return bool(call(pb.ServerLiveRequest(), metadata=metadata, timeout=5).live)

    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)) as channel:
        assert live(channel)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
        live(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("port_of", ["gateway", "admin", "grpc"])
def test_a_tls_handshake_never_finished_is_closed_at_the_head_timeout(secure: Stack, port_of: str) -> None:
    port = {
        "gateway": int(secure.gateway.rsplit(":", 1)[1]),
        "admin": secure.settings.control_port,
        "grpc": secure.settings.grpc_port,
    }[port_of]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        started = time.monotonic()
        raw.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, and then nothing
        try:
            assert raw.recv(1024) == b""  # closed by the server
        except ConnectionResetError:
            pass
        waited = time.monotonic() - started
    assert 2.0 < waited < 8.0, waited  # header_timeout_s is 3 here (asyncio's default is 60, gRPC's 120)


def test_metrics_ports_ask_for_a_client_certificate(secure: Stack) -> None:
    url = secure.gateway_metrics_url().replace("http://", "https://")
    port = secure.gateway_metrics_ports[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10):  # an idle connection, no handshake
        assert "bastion_" in httpx.get(url, verify=secure.verify, timeout=10).text  # blocks no scrape
    ca_only = TLSFiles(ca=secure.certs / "ca.pem").client_context()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=ca_only, timeout=10)


# require_tls ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("role", "env", "expected"),
    [
        ("gateway", {"BASTION_REDIS_URL": "redis://127.0.0.1:6379/0"}, "must be rediss://"),
        ("worker", {"BASTION_REDIS_URL": "rediss://127.0.0.1:6379/0"}, "BASTION_TLS_CERT, BASTION_TLS_KEY"),
        (
            "control",
            {"BASTION_REDIS_URL": "rediss://r:6379/0", "BASTION_DATABASE_URL": "postgresql://u@db/x?sslmode=require"},
            "sslmode=verify-full",
        ),
        ("up", {}, "pass --tls"),
        (
            "gateway",
            {"BASTION_REDIS_URL": "rediss://127.0.0.1:6379/0?ssl_cert_reqs=none&ssl_check_hostname=false"},
            "must not set ssl_cert_reqs, ssl_check_hostname",
        ),
        ("gateway", {"BASTION_REDIS_URL": "REDIS://127.0.0.1:6379/0"}, "must be rediss://"),
        ("worker", {"BASTION_REDIS_URL": "rediss://r:6379/0", "OTEL_TRACES_EXPORTER": "otlp"}, "http://localhost:4318"),
        (
            "gateway",
            {
                "BASTION_REDIS_URL": "rediss://r:6379/0",
                "BASTION_OIDC_ISSUER": "https://idp.example",
                "BASTION_OIDC_AUDIENCE": "bastion",
                "BASTION_OIDC_JWKS_URL": "http://idp.example/jwks",
            },
            "BASTION_OIDC_JWKS_URL must be https://",
        ),
        ("up", {"BASTION_TLS": "true", "BASTION_REDIS_URL": "redis://127.0.0.1:6379/0"}, "must be rediss://"),
    ],
)
def test_require_tls_refuses_to_start_with_a_plaintext_hop(
    role: str, env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bastion", role],
        env={**os.environ, "BASTION_DATA_DIR": str(tmp_path), "BASTION_REQUIRE_TLS": "true", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "BASTION_REQUIRE_TLS" in done.stderr and expected in done.stderr
