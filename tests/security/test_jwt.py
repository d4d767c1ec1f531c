"""JWT bearer tokens verified against a real JWKS endpoint (HTTP on 127.0.0.1), and the usual attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from bastion.embedded.redis_server import free_port
from tests.support import Stack, running, wait_until

ROW = [1.0] * 30
PREDICT = "/v1/models/breast-cancer/predict"
AUDIENCE = "bastion-api"


class Issuer:
    """An OIDC issuer: discovery document and JWKS served over HTTP; keys can be rotated."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.keys: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "ed-1": ed25519.Ed25519PrivateKey.generate(),
        }
        self.published = set(self.keys)
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks.json"}
                elif self.path == "/jwks.json":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid in sorted(self.published):
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[_alg(kid)].to_jwk(self.keys[kid].public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": keys}

    def token(self, kid: str = "rsa-1", alg: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "user-1", "tenant": "acme", "scope": "predict jobs"}
        body |= {"iat": now, "exp": now + 300} | claims
        return jwt.encode(body, self.keys[kid], algorithm=alg or _alg(kid), headers={"kid": kid})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _alg(kid: str) -> str:
    return {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}[kid.split("-")[0]]


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    found = Issuer()
    yield found
    found.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, issuer: Issuer) -> Iterator[Stack]:
    with running(
        tmp_path_factory.mktemp("jwt"), oidc_issuer=issuer.url, oidc_audience=AUDIENCE, oidc_jwks_cache_s=2.0
    ) as s:
        yield s


def _call(stack: Stack, token: str) -> httpx.Response:
    return httpx.post(f"{stack.gateway}{PREDICT}", json={"inputs": [ROW]}, headers={"Authorization": f"Bearer {token}"})


def test_tokens_signed_with_each_allowed_algorithm_are_accepted(stack: Stack, issuer: Issuer) -> None:
    for kid in ("rsa-1", "ec-1", "ed-1"):
        r = _call(stack, issuer.token(kid))
        assert r.status_code == 200, (kid, r.text)
    # API keys keep working beside tokens.
    assert _call(stack, stack.keys["acme"]).status_code == 200


def _hs256_with_public_key(issuer: Issuer) -> str:
    """The classic key-confusion attack: HMAC 'signed' with the issuer's RSA public key."""
    public_pem = issuer.keys["rsa-1"].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "tenant": "acme", "scope": "predict"}
    claims["exp"] = int(time.time()) + 300

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def _alg_none(issuer: Issuer) -> str:
    claims = {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "tenant": "acme", "scope": "predict"}
    claims["exp"] = int(time.time()) + 300
    return jwt.encode(claims, None, algorithm="none", headers={"kid": "rsa-1"})


def test_jwt_attacks_are_refused_with_a_clear_401(stack: Stack, issuer: Issuer) -> None:
    now = int(time.time())
    other = Issuer()
    try:
        attacks = {
            "alg none": (_alg_none(issuer), "algorithm 'none' is not accepted"),
            "HS256 with the RSA public key": (_hs256_with_public_key(issuer), "algorithm 'HS256' is not accepted"),
            "expired": (issuer.token(exp=now - 120), "has expired"),
            "not yet valid": (issuer.token(nbf=now + 600), "not valid yet"),
            "wrong audience": (issuer.token(aud="someone-else"), "another audience"),
            "wrong issuer": (issuer.token(iss="https://evil.example"), "another issuer"),
            "no exp": (issuer.token(exp=None), "lacks the 'exp' claim"),
            "garbage": ("not-a-jwt", "neither an API key nor a well-formed JWT"),
            "tampered payload": (_tamper(issuer.token()), "does not verify"),
        }
        unknown_kid = jwt.encode(
            {"iss": issuer.url, "aud": AUDIENCE, "sub": "x", "tenant": "acme", "exp": now + 300},
            other.keys["rsa-1"],
            algorithm="RS256",
            headers={"kid": "rsa-404"},
        )
        attacks["unknown kid"] = (unknown_kid, "unknown 'kid'")
        attacks["right kid, wrong key"] = (other.token("rsa-1"), "does not verify")
    finally:
        other.close()
    for name, (token, says) in attacks.items():
        r = _call(stack, token)
        assert r.status_code == 401, (name, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert says in r.json()["detail"], (name, r.json()["detail"])
        assert token not in r.text


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["tenant"] = "globex"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


def test_tenant_and_scopes_come_from_claims_and_the_registry(stack: Stack, issuer: Issuer) -> None:
    unknown = _call(stack, issuer.token(tenant="nobody"))
    assert unknown.status_code == 403 and "no registered tenant" in unknown.json()["detail"]
    no_scope = _call(stack, issuer.token(scope="jobs"))
    assert no_scope.status_code == 403 and "lacks the scope" in no_scope.json()["detail"]
    as_list = _call(stack, issuer.token(scope=["predict"], tenant="globex"))
    assert as_list.status_code == 200


def test_a_token_naming_the_operators_tenant_is_refused(stack: Stack, issuer: Issuer) -> None:
    """'operators' is a registered tenant (the admin API's), but not a serving one: no token may act as it."""
    assert any(k["tenant"] == "operators" for k in stack.admin.keys("operators")), "the tenant exists"
    for scope in ("predict", "predict jobs models:read admin"):
        r = _call(stack, issuer.token(tenant="operators", scope=scope))
        assert r.status_code == 403, (scope, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert "operators are not a serving tenant" in r.json()["detail"]


def test_issuer_key_rotation_is_picked_up_without_a_restart(stack: Stack, issuer: Issuer) -> None:
    issuer.keys["rsa-2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer.published = {"rsa-2", "ec-1", "ed-1"}
    wait_until(lambda: _call(stack, issuer.token("rsa-2")).status_code == 200, 10, "the new kid to be accepted")
    wait_until(lambda: _call(stack, issuer.token("rsa-1")).status_code == 401, 10, "the retired kid to be refused")
