"""JWT bearer tokens from an OIDC issuer, verified against its JWKS.

What is checked, in order: the token is at most ``MAX_TOKEN_BYTES`` long (before anything decodes
it: 8 KiB is far beyond any issuer's tokens, and a 26 MB one costs seconds of CPU); it parses; its
``alg`` is on the allow-list (RS256, ES256, EdDSA by default - never ``none`` or an HMAC algorithm,
so a token "signed" with the issuer's public key as an HMAC secret is refused before any key is
touched); its ``kid`` names a key in the issuer's JWKS (fetched over HTTPS, cached, fetched again
once when an unknown ``kid`` shows up, at most every ``min_refetch_s``, so issuer key rotation just
works and random kids cannot make us hammer the issuer); the key's type fits the algorithm; the
signature; then ``iss``, ``aud``, ``exp`` and ``nbf`` (all required but ``nbf``; 30 s leeway). Every
failure is an ``Unauthenticated`` that says what was wrong, without echoing the token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from bastion.errors import Unauthenticated, Unavailable

_LEEWAY_S = 30
MAX_TOKEN_BYTES = 8 << 10  # longest bearer token (JWT or API key) looked at


def check_length(token: str) -> None:
    """Refuse a bearer token longer than ``MAX_TOKEN_BYTES`` before anything decodes or hashes it."""
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes; tokens that long are refused")


@dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    cache_s: float = 300.0
    min_refetch_s: float = 10.0
    https_only: bool = False  # require_tls: a discovered jwks_uri in clear is refused (keys could be replaced)


class JwksCache:
    """The issuer's signing keys by ``kid``, fetched over HTTP and kept for ``cache_s``."""

    def __init__(self, config: OidcConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        self._keys: dict[str, jwt.PyJWK] = {}
        self._stale_at = 0.0  # keys are fetched again after this (monotonic seconds)
        self._next_fetch = 0.0  # no fetch before this: bounds fetches caused by unknown kids or failures
        self._failed = False
        self._lock = asyncio.Lock()
        self._jwks_url = config.jwks_url

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        if (now >= self._stale_at or kid not in self._keys) and now >= self._next_fetch:
            await self._refresh()
        if not self._keys and self._failed:
            raise Unavailable("the identity provider's signing keys could not be fetched", retry_after=5)
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        async with self._lock:
            if time.monotonic() < self._next_fetch:
                return  # another request fetched while this one waited
            self._next_fetch = time.monotonic() + self.config.min_refetch_s
            try:
                url = self._jwks_url or await self._discover()
                response = await self.http.get(url)
                response.raise_for_status()
                found = jwt.PyJWKSet.from_dict(response.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWKSetError):
                self._failed = True  # keep serving with the keys we have, if any
                return
            self._keys = {k.key_id: k for k in found.keys if k.key_id}
            self._stale_at = time.monotonic() + self.config.cache_s
            self._failed = False

    async def _discover(self) -> str:
        response = await self.http.get(self.config.issuer.rstrip("/") + "/.well-known/openid-configuration")
        response.raise_for_status()
        url = response.json().get("jwks_uri")
        if not isinstance(url, str):
            raise ValueError("the issuer's discovery document has no jwks_uri")
        if self.config.https_only and not url.lower().startswith("https://"):
            raise ValueError("the issuer's jwks_uri is not https:// and BASTION_REQUIRE_TLS is set")
        self._jwks_url = url
        return url


async def verify(token: str, cache: JwksCache) -> dict[str, Any]:
    """The token's verified claims, or ``Unauthenticated`` saying why not."""
    config = cache.config
    check_length(token)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthenticated("the bearer token is neither an API key nor a well-formed JWT") from exc
    alg = header.get("alg")
    if alg not in config.algorithms:
        raise Unauthenticated(f"JWT algorithm {str(alg)[:16]!r} is not accepted; allowed: {list(config.algorithms)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("the JWT has no 'kid' header")
    key = await cache.key(kid)
    if key is None:
        raise Unauthenticated("the JWT is signed with a key the issuer does not publish (unknown 'kid')")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key.key,
            algorithms=[alg],
            audience=config.audience,
            issuer=config.issuer,
            leeway=_LEEWAY_S,
            options={"require": ["exp", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("the JWT has expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise Unauthenticated("the JWT is not valid yet ('nbf')") from exc
    except jwt.InvalidAudienceError as exc:
        raise Unauthenticated("the JWT is for another audience ('aud')") from exc
    except jwt.InvalidIssuerError as exc:
        raise Unauthenticated("the JWT is from another issuer ('iss')") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthenticated(f"the JWT lacks the '{exc.claim}' claim") from exc
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        raise Unauthenticated("the JWT signature does not verify") from exc
    return claims
