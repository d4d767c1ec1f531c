"""Request bodies of the admin API (unknown fields are refused)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from bastion.constants import DEFAULT_TENANT_SCOPES
from bastion.registry.limits import TenantLimits
from bastion.registry.service import MAX_RETENTION_S
from bastion.timefmt import parse_iso


def _utc(value: Any) -> Any:
    """An ISO 8601 string as an aware UTC datetime (no zone: UTC). A number is refused: epoch
    seconds and milliseconds look alike, and the API speaks ISO 8601 only."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an ISO 8601 time as a string, e.g. 2030-01-01T00:00:00Z")
    return parse_iso(value)


UtcDatetime = Annotated[datetime, BeforeValidator(_utc)]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    name: str = Field(default="", max_length=128)
    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_TENANT_SCOPES), min_length=1, max_length=16)
    expires_at: UtcDatetime | None = Field(
        default=None,
        description="ISO 8601 date or time; without a zone it is UTC, and a date alone is its 00:00 UTC, e.g. "
        "2030-01-01T00:00:00Z or 2030-01-01",
    )
    tier: str | None = Field(default=None, max_length=32, description="rate tier (settings: rate_tiers)")
    subject_trusted: bool = Field(
        default=False, description="the key may name the subject of a request (X-Bastion-Subject): trusted back ends"
    )


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overlap_s: int = Field(default=3600, ge=0, le=30 * 86_400, description="how long the old secret keeps working")


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(pattern=r"^[0-9]{1,19}-[0-9]{1,19}$")]] = Field(
        default_factory=list, max_length=1000, description="dead-letter entry ids; empty: the newest 1,000"
    )


class RouteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=1_000_000)
    weight: int = Field(default=100, ge=0, le=10_000)
    role: Literal["primary", "canary", "shadow"] = "primary"


class RuleIn(BaseModel):
    """Callers of this jurisdiction (or tenant, or lacking this consent) may reach only ``allow``."""

    model_config = ConfigDict(extra="forbid")

    jurisdiction: str | None = Field(default=None, min_length=1, max_length=16)
    tenant: str | None = Field(default=None, min_length=1, max_length=64)
    without_consent: str | None = Field(default=None, min_length=1, max_length=32)
    allow: list[int] = Field(max_length=64)


class DeploymentSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[RouteIn] = Field(min_length=1, max_length=16)
    fallback_version: int | None = Field(default=None, ge=1, le=1_000_000)
    rules: list[RuleIn] = Field(default_factory=list, max_length=64)


class TenantSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jurisdiction: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,16}$")
    signing_key: str | None = Field(
        default=None, max_length=1000, description="Ed25519 public key: PEM, or base64 of the raw 32 bytes"
    )
    limits: TenantLimits | None = Field(default=None, description="compute-cost budget per (tenant, model)")
    consents: list[str] | None = Field(
        default=None, max_length=64, description="consent flags the tenant holds (matched by 'without_consent' rules)"
    )
    retain_payloads_s: int | None = Field(
        default=None,
        ge=0,
        le=MAX_RETENTION_S,
        description="how long the decision log keeps the tenant's inputs and outputs (encrypted per subject), "
        "seconds; 0: not kept (the default). Changing it needs the 'audit' scope",
    )


class StageSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal["registered", "staging", "production", "retired"]


# the decision log ---------------------------------------------------------------------------
TenantName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
ModelName = Annotated[str, Field(min_length=1, max_length=128)]
Subject = Annotated[
    str, Field(min_length=1, max_length=256, description="the data subject's id, as X-Bastion-Subject named it")
]
MAX_POSITION = 2**62


class AuditSearch(BaseModel):
    """Filters of a decision-log search (every one given must match); POSTed so that a subject
    never appears in a URL or an access log."""

    model_config = ConfigDict(extra="forbid")

    tenant: TenantName | None = Field(default=None, description="needed with subject or model")
    subject: Subject | None = Field(default=None, description="the subject's id; matched by its pseudonym")
    model: ModelName | None = None
    version: int | None = Field(default=None, ge=1, le=1_000_000, description="needs model")
    kind: Literal["decision", "admin", "erasure"] | None = None
    since: UtcDatetime | None = Field(default=None, description="ISO 8601; events at or after it")
    until: UtcDatetime | None = Field(default=None, description="ISO 8601; events before it")
    after: int | None = Field(default=None, ge=0, le=MAX_POSITION, description="the cursor: next_after of a page")
    limit: int = Field(default=100, ge=1, le=1000)


class AuditVerify(BaseModel):
    """A range of positions to verify: ``from`` (default 0) up to ``to`` (exclusive; default: the end)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    start: int = Field(default=0, ge=0, le=MAX_POSITION, alias="from")
    end: int | None = Field(default=None, ge=0, le=MAX_POSITION, alias="to")


class SubjectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: Subject
