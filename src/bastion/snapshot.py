"""The control-plane snapshot: what gateways and workers know without SQL.

The control plane writes the snapshot as JSON to ``snap:current``, its serial to the small
``snap:serial`` key (in the same atomic step), and announces it on ``snap:notify``. Readers keep
the parsed snapshot in memory and fetch it again on a notice; every ``snapshot_refresh_s``, in
case a notice was missed, they read only ``snap:serial`` and fetch the snapshot when it names a
serial other than the one they hold (or is missing: a Redis written before the key existed). An
idle process therefore reads a few bytes per period, whatever the snapshot's size.

Every snapshot carries a ``serial``; a higher serial is a later read of the control plane's
state (the registry issues serials in SQL, see ``Registry.snapshot``). ``publish`` writes a
snapshot only when its serial is higher than the stored one (``publish_snapshot.lua``), so a slow
publisher can never bring back a revoked key or undo a kill switch; readers likewise ignore a
snapshot older than the one they hold (``Snapshot.newer_than``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion.constants import SNAPSHOT_CHANNEL, SNAPSHOT_KEY, SNAPSHOT_SERIAL_KEY
from bastion.queue.scripts import Lua
from bastion.signature import Signature

PUBLISH = Lua("publish_snapshot")


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's budgets (``bastion.registry.limits``); a burst of 0 means no bucket.

    Compute units: ``*_rate`` per second. Text jobs only: tokens and requests, ``*_per_min``
    refilled per minute, ``*_burst`` the bucket size (resolved: the per-minute amount unless set)."""

    tenant_rate: float = 0.0
    tenant_burst: float = 0.0
    key_rate: float = 0.0
    key_burst: float = 0.0
    max_concurrency: int = 0
    tenant_tokens_per_min: float = 0.0
    tenant_tokens_burst: float = 0.0
    tenant_requests_per_min: float = 0.0
    tenant_requests_burst: float = 0.0
    key_tokens_per_min: float = 0.0
    key_tokens_burst: float = 0.0
    key_requests_per_min: float = 0.0
    key_requests_burst: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Limits:
        """A snapshot's limits; a snapshot from before text budgets has none (no bucket)."""
        if not data:
            return NO_LIMITS
        get = data.get

        def per_min(name: str) -> tuple[float, float]:
            rate = float(get(f"{name}_per_min") or 0.0)
            return rate, float(get(f"{name}_burst", rate) or 0.0)

        return cls(
            float(get("tenant_rate", 0.0)),
            float(get("tenant_burst", 0.0)),
            float(get("key_rate", 0.0)),
            float(get("key_burst", 0.0)),
            int(get("max_concurrency", 0)),
            *per_min("tenant_tokens"),
            *per_min("tenant_requests"),
            *per_min("key_tokens"),
            *per_min("key_requests"),
        )


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    tenant: str
    scopes: frozenset[str]
    expires_at: float | None
    jurisdiction: str | None = None
    consents: frozenset[str] = frozenset()
    limits: Limits = NO_LIMITS
    subject_trusted: bool = False  # operators let this key name its subject (X-Bastion-Subject)
    retain_payloads: bool = False  # the decision log keeps the tenant's inputs and outputs (encrypted)
    data_subject: str = ""  # a token's subject claim (oidc_subject_claim): in memory only, never queued

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


@dataclass(frozen=True, slots=True)
class TenantInfo:
    """A tenant's attributes, for callers identified by a JWT rather than an API key."""

    jurisdiction: str | None
    consents: frozenset[str]
    limits: Limits
    retain_payloads: bool = False


@dataclass(frozen=True, slots=True)
class TextInfo:
    """What a text version adds (``bastion.text``): its task, its tokenizer and its config.

    ``tokenizer`` is the sha256 of the tokenizer JSON: the artifact store holds it for workers,
    and the control plane keeps a copy in Redis under ``tok:{sha256}`` for gateways (which count
    tokens and render chat templates before anything is queued). ``config`` is the task's config
    as ``EmbeddingConfig.to_dict()`` or ``GenerationConfig.to_dict()`` gives it."""

    task: str  # TASK_EMBEDDING or TASK_GENERATION (bastion.text.jobs)
    tokenizer: str
    config: dict[str, Any] = field(compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> TextInfo | None:
        if not data:
            return None
        return cls(str(data["task"]), str(data["tokenizer"]), dict(data.get("config") or {}))


@dataclass(frozen=True, slots=True)
class VersionInfo:
    model: str
    version: int
    sha256: str
    signature: Signature
    postprocessing: dict[str, Any] | None = None  # only when it changes outputs (a threshold)
    # drift bins and model-metric outputs (``bastion.monitoring.bins.spec``), shipped by the control
    # plane; workers compile it once per version (``bastion.monitoring.counting``)
    monitoring: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    text: TextInfo | None = None  # a text model's task, tokenizer and config; None: a tensor model


@dataclass(frozen=True, slots=True)
class Route:
    version: VersionInfo
    weight: int
    role: str


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy rule: callers of this tenant or jurisdiction, or lacking this consent, may reach only ``allow``."""

    jurisdiction: str | None
    tenant: str | None
    allow: frozenset[int]
    without_consent: str | None = None

    def applies(self, tenant: str, jurisdiction: str | None, consents: frozenset[str] = frozenset()) -> bool:
        return (
            (self.tenant is None or self.tenant == tenant)
            and (self.jurisdiction is None or self.jurisdiction == jurisdiction)
            and (self.without_consent is None or self.without_consent not in consents)
        )


@dataclass(frozen=True, slots=True)
class Serving:
    """A model's serving options (``bastion.registry.serving``); None: the process setting."""

    timeout_s: float | None = None
    max_queue_sync: int | None = None
    max_queue_batch: int | None = None
    cache_ttl_s: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Serving:
        data = data or {}
        return cls(
            data.get("timeout_s"), data.get("max_queue_sync"), data.get("max_queue_batch"), data.get("cache_ttl_s", 0)
        )


DEFAULT_SERVING = Serving()


@dataclass(frozen=True, slots=True)
class ModelRoutes:
    """How one model's traffic is split now (see ``bastion.registry.deployments``)."""

    routes: tuple[Route, ...]
    fallback: VersionInfo | None
    disabled: bool
    rules: tuple[Rule, ...] = ()
    preload: tuple[int, ...] = ()  # versions about to take traffic: workers load and warm them up now
    serving: Serving = DEFAULT_SERVING
    # the model's guard policy as ``bastion.guards.parse_policy`` reads it (None: every guard off)
    guards: dict[str, Any] | None = field(default=None, compare=False)
    shadows: tuple[Route, ...] = field(init=False, default=(), compare=False, repr=False)  # found once

    def __post_init__(self) -> None:
        object.__setattr__(self, "shadows", tuple(r for r in self.routes if r.role == "shadow"))

    @property
    def total_weight(self) -> int:
        return sum(r.weight for r in self.routes if r.role != "shadow")


@dataclass(frozen=True, slots=True)
class Snapshot:
    serial: int
    keys: dict[str, KeyInfo]
    models: dict[str, ModelRoutes]
    versions: dict[tuple[str, int], VersionInfo]
    tenants: dict[str, TenantInfo] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Snapshot:
        return cls(0, {}, {}, {})

    def outdated(self, redis: Any) -> bool:
        """Whether the published snapshot may differ from this one: ``snap:serial`` (read with the
        sync client ``redis``) names another serial, or is missing. A few bytes, not the snapshot."""
        return changed(redis.get(SNAPSHOT_SERIAL_KEY), self.serial)

    def newer_than(self, other: Snapshot) -> bool:
        """Whether this snapshot should replace ``other`` (readers keep the highest serial)."""
        return self.serial > other.serial

    @classmethod
    def parse(cls, raw: bytes) -> Snapshot:
        data = orjson.loads(raw)
        keys = {
            digest: KeyInfo(
                k["id"],
                k["tenant"],
                frozenset(k["scopes"]),
                k.get("expires_at"),
                k.get("jurisdiction"),
                frozenset(k.get("consents") or ()),
                Limits.from_dict(k.get("limits")),
                bool(k.get("subject_trusted", False)),
                bool(k.get("retain_payloads", False)),
            )
            for digest, k in data["keys"].items()
        }
        versions: dict[tuple[str, int], VersionInfo] = {}
        models: dict[str, ModelRoutes] = {}
        for name, model in data["models"].items():
            for number, v in model["versions"].items():
                versions[(name, int(number))] = VersionInfo(
                    name,
                    int(number),
                    v["sha256"],
                    Signature.from_dict(v["signature"]),
                    v.get("postprocessing"),
                    v.get("monitoring"),
                    TextInfo.from_dict(v.get("text")),
                )
            routes = tuple(
                Route(versions[(name, int(r["version"]))], int(r["weight"]), str(r["role"]))
                for r in model.get("routes", [])
                if (name, int(r["version"])) in versions
            )
            fallback = model.get("fallback")
            models[name] = ModelRoutes(
                routes=routes,
                fallback=versions.get((name, int(fallback))) if fallback is not None else None,
                disabled=bool(model.get("disabled", False)),
                rules=tuple(
                    Rule(
                        r.get("jurisdiction"),
                        r.get("tenant"),
                        frozenset(int(v) for v in r["allow"]),
                        r.get("without_consent"),
                    )
                    for r in model.get("rules") or []
                ),
                preload=tuple(int(v) for v in model.get("preload") or ()),
                serving=Serving.from_dict(model.get("serving")),
                guards=model.get("guards") or None,
            )
        tenants = {
            name: TenantInfo(
                t.get("jurisdiction"),
                frozenset(t.get("consents") or ()),
                Limits.from_dict(t.get("limits")),
                bool(t.get("retain_payloads", False)),
            )
            for name, t in (data.get("tenants") or {}).items()
        }
        return cls(int(data.get("serial", 0)), keys, models, versions, tenants)


def encode(data: dict[str, Any]) -> tuple[int, bytes]:
    """The serial and the JSON of a snapshot; the serial is ``data["serial"]`` when the registry
    issued one, else the time in nanoseconds. It is always the document's first field, where
    ``publish_snapshot.lua`` reads it back."""
    serial = int(data.get("serial") or time.time_ns())
    return serial, orjson.dumps({"serial": serial, **{k: v for k, v in data.items() if k != "serial"}})


def changed(polled: bytes | str | None, held: int) -> bool:
    """Whether a value read from ``snap:serial`` means the snapshot must be fetched again: it is
    missing or unreadable, or names a serial other than ``held`` (0: nothing held yet)."""
    if polled is None or not held:
        return True
    try:
        return int(polled) != held
    except ValueError:
        return True


def polled_serial(redis: Any) -> int | None:
    """The serial ``snap:serial`` names (None: missing or unreadable)."""
    raw = redis.get(SNAPSHOT_SERIAL_KEY)
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def stored_serial(redis: Any) -> int | None:
    """The serial of the snapshot Redis holds (None: none, or one without a serial)."""
    head = redis.getrange(SNAPSHOT_KEY, 0, 40)
    found = re.match(rb'\{"serial":(\d+)', head or b"")
    return int(found.group(1)) if found else None


def publish(redis: Any, data: dict[str, Any]) -> tuple[int, bool]:
    """Write the snapshot and notify readers, unless the stored one has a serial as high or
    higher (``redis`` is a sync redis-py client). Returns the serial Redis holds now and whether
    it is this snapshot's."""
    serial, raw = encode(data)
    stored, written = PUBLISH.call(redis, [SNAPSHOT_KEY, SNAPSHOT_SERIAL_KEY], [str(serial), raw, SNAPSHOT_CHANNEL])
    return int(stored), bool(int(written))
