"""Compute-cost budgets: what operators set per tenant and per key tier, resolved per key.

A compute unit is one millisecond of worker inference time. A tenant's budget applies to each
(tenant, model) pair: a token bucket of ``burst`` units refilled at ``units_per_s`` (0: never
refilled; the bucket's Redis key expires after a day, so that is a daily budget), plus a cap on
its jobs in flight. A key's tier adds a second bucket per key. Unset means unlimited.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bastion.errors import InvalidInput


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    units_per_s: float = Field(default=0.0, ge=0.0, le=1e9, description="refill rate, compute units per second")
    burst: float | None = Field(default=None, gt=0.0, le=1e12, description="bucket size; unset: unlimited")


class TenantLimits(Budget):
    max_concurrency: int = Field(default=0, ge=0, le=1_000_000, description="jobs in flight; 0: no cap")


def parse_tiers(text: str) -> dict[str, Budget]:
    """``{"standard": {"units_per_s": 10000, "burst": 20000}, "unlimited": {}}`` from settings."""
    try:
        raw = orjson.loads(text)
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        return {str(name): Budget.model_validate(value) for name, value in raw.items()}
    except (orjson.JSONDecodeError, TypeError, ValidationError) as exc:
        raise InvalidInput(f"rate tiers are not valid: {exc}") from exc


def resolve(tenant: dict[str, Any] | None, tier: Budget | None) -> dict[str, Any]:
    """The numbers a gateway passes to the admission script for one key."""
    limits = TenantLimits.model_validate(tenant or {})
    return {
        "tenant_rate": limits.units_per_s,
        "tenant_burst": limits.burst or 0.0,
        "key_rate": tier.units_per_s if tier else 0.0,
        "key_burst": (tier.burst or 0.0) if tier else 0.0,
        "max_concurrency": limits.max_concurrency,
    }
