"""The descriptor of an upstream generation version: which OpenAI-compatible server answers for it.

An upstream version is a generation version whose config carries ``upstream``::

    "upstream": {"url": "http://10.0.0.7:8000/v1", "model": "llama-3.1-8b-instruct",
                 "api_key_env": "BASTION_UPSTREAM_KEY_VLLM", "timeout_s": 60}

Its tokenizer and the rest of its config still count prompt tokens, render the chat template and
bound the context at the gateway; at the worker, generation is forwarded to the server
(``bastion.runtime.upstream``) instead of running an ONNX graph. What is checked here, wherever the
config is parsed (registry, gateway, worker):

- ``url``: ``http`` or ``https``, an explicit host and port, a plain path (``/v1``), no user
  name or password, query or fragment: the address is data, never a place to smuggle a credential;
- ``model``: 1 to ``MAX_MODEL_CHARS`` printable characters, the name the server knows the model by;
- ``api_key_env``: the *name* of an environment variable on the workers that holds the key (the key
  itself never enters the registry, the snapshot or a log); it must start with
  ``BASTION_UPSTREAM_KEY_`` (an allowlist: no other variable of a worker's environment, Bastion's
  own secrets included, is ever sent to an upstream);
- ``timeout_s``: how long the server may stay silent (connecting, or between two chunks), 1 to 600.

``parse_hosts`` reads ``BASTION_UPSTREAM_HOSTS`` (``host:port,host:port``): a worker forwards only
to the servers it names, and a confined worker may connect to their ports only.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
MAX_URL_CHARS = 512
MAX_MODEL_CHARS = 256
MAX_TIMEOUT_S = 600.0
DEFAULT_TIMEOUT_S = 60.0
_FIELDS = frozenset({"url", "model", "api_key_env", "timeout_s"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
KEY_ENV_PREFIX = "BASTION_UPSTREAM_KEY_"  # the only environment variables a worker sends upstream
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_PATH = re.compile(r"^(?:/[A-Za-z0-9._~-]+)*/?$")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str  # normalised: lower-case scheme and host, no trailing slash
    model: str
    api_key_env: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def host(self) -> str:
        """``host:port`` as ``BASTION_UPSTREAM_HOSTS`` names it (an IPv6 host in brackets)."""
        return urlsplit(self.url).netloc

    @property
    def port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    @property
    def completions_url(self) -> str:
        return self.url + "/completions"

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> UpstreamConfig:
        """The descriptor, or a ``ValueError`` saying which field is wrong and how."""
        if not isinstance(found, Mapping):
            raise ValueError("upstream must be an object with url and model")
        unknown = set(found) - _FIELDS
        if unknown:
            raise ValueError(f"unknown upstream fields: {sorted(str(u)[:64] for u in unknown)[:10]}")
        key_env = found.get("api_key_env")
        if key_env is not None:
            key_env = check_env_name(key_env)
        return cls(
            url=check_url(found.get("url")),
            model=_model(found.get("model")),
            api_key_env=key_env,
            timeout_s=_timeout(found.get("timeout_s", DEFAULT_TIMEOUT_S)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "api_key_env": self.api_key_env, "timeout_s": self.timeout_s}


def check_url(url: object) -> str:
    """The upstream's base URL, normalised; ``ValueError`` unless it is a plain http(s) address."""
    if not isinstance(url, str) or not url:
        raise ValueError("upstream url must be a string such as 'http://10.0.0.7:8000/v1'")
    if len(url) > MAX_URL_CHARS or not url.isascii() or any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"upstream url must be printable ASCII of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("upstream url does not parse (a port must be a number from 1 to 65535)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"upstream url must be http or https, not {parts.scheme[:16]!r}")
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        raise ValueError("upstream url must not carry a user name or password (name the key with api_key_env)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("upstream url must not carry a query or a fragment")
    if port is None or not 1 <= port <= 65535:
        raise ValueError("upstream url must name its port explicitly (http://host:8000/v1)")
    host = check_host(parts.hostname or "")
    if not _PATH.match(parts.path) or any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValueError("upstream url's path must be plain segments such as /v1")
    return f"{scheme}://{_netloc(host, port)}{parts.path.rstrip('/')}"


def check_host(host: str) -> str:
    """A host name or IP address (IPv6 without brackets), lower-cased; ``ValueError`` otherwise."""
    host = host.lower()
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"upstream host {host[:64]!r} is not a valid IPv6 address") from None
        return host
    if not _HOST_NAME.match(host):
        raise ValueError(f"upstream host {host[:64]!r} is not a valid host name or IPv4 address")
    return host


def check_env_name(name: object) -> str:
    """An environment variable's name that may hold an upstream key; ``ValueError`` otherwise."""
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ValueError(
            "upstream api_key_env must be the name of an environment variable on the workers "
            "(letters, digits and _, at most 128), never the key itself"
        )
    if not name.startswith(KEY_ENV_PREFIX):
        # an allowlist: only variables the operator made for upstream keys may be sent upstream
        # (anything else in a worker's environment, Bastion's own secrets included, never is)
        raise ValueError(
            f"upstream api_key_env must name a variable starting with {KEY_ENV_PREFIX} "
            f"(e.g. {KEY_ENV_PREFIX}VLLM): only those are ever sent to an upstream"
        )
    return name


def _model(found: object) -> str:
    if not isinstance(found, str) or not 0 < len(found) <= MAX_MODEL_CHARS or not found.isprintable():
        raise ValueError(f"upstream model must be the server's model name: 1 to {MAX_MODEL_CHARS} printable characters")
    return found


def _timeout(found: object) -> float:
    if isinstance(found, bool) or not isinstance(found, int | float) or not math.isfinite(found):
        raise ValueError(f"upstream timeout_s must be a number of seconds from 1 to {MAX_TIMEOUT_S:g}")
    if not 1 <= found <= MAX_TIMEOUT_S:
        raise ValueError(f"upstream timeout_s must be a number of seconds from 1 to {MAX_TIMEOUT_S:g}")
    return float(found)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hosts(value: str) -> frozenset[str]:
    """``BASTION_UPSTREAM_HOSTS`` as a set of normalised ``host:port``; ``ValueError`` for an entry
    that is not one (an empty value: no upstream is allowed)."""
    found: set[str] = set()
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            parts = urlsplit(f"//{entry}")
            port = parts.port
        except ValueError:
            raise ValueError(f"upstream host {entry[:64]!r} must be host:port") from None
        if port is None or not 1 <= port <= 65535 or parts.path or parts.query or "@" in entry:
            raise ValueError(f"upstream host {entry[:64]!r} must be host:port")
        found.add(_netloc(check_host(parts.hostname or ""), port))
    return frozenset(found)


def host_ports(value: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of ``BASTION_UPSTREAM_HOSTS`` (for the confined worker's rules)."""
    out = []
    for entry in sorted(parse_hosts(value)):
        parts = urlsplit(f"//{entry}")
        out.append((parts.hostname or "", int(parts.port or 0)))
    return out
