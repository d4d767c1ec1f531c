"""Compute-cost budgets: what operators set per tenant and per key tier, resolved per key.

A compute unit is one millisecond of worker inference time. A tenant's budget applies to each
(tenant, model) pair: a token bucket of ``burst`` units refilled at ``units_per_s`` (0: never
refilled; the bucket's Redis key expires after a day, so that is a daily budget), plus a cap on
its jobs in flight. A key's tier adds a second bucket per key. Unset means unlimited.

Text jobs (embeddings, generations) also count text tokens (prompt + ``max_tokens``; the worker
gives back what a generation did not use) and requests, in buckets refilled per minute: per
(tenant, model) from the tenant's limits, per key from its tier. A bucket holds ``*_burst``, the
per-minute amount unless set; a burst with a rate of 0 is never refilled (a daily budget, as
above). Unset means unlimited; jobs that are not text jobs never touch these buckets.
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
    tokens_per_min: int | None = Field(
        default=None, ge=0, le=10**12, description="text tokens per minute (prompt + max_tokens); unset: unlimited"
    )
    tokens_burst: int | None = Field(
        default=None, gt=0, le=10**12, description="text token bucket size; unset: tokens_per_min"
    )
    requests_per_min: int | None = Field(
        default=None, ge=0, le=10**9, description="text requests per minute; unset: unlimited"
    )
    requests_burst: int | None = Field(
        default=None, gt=0, le=10**9, description="text request bucket size; unset: requests_per_min"
    )

    def per_minute(self, name: str) -> tuple[float, float]:
        """(refill per minute, bucket size) of the ``tokens`` or ``requests`` bucket; size 0: none."""
        rate = getattr(self, f"{name}_per_min")
        burst = getattr(self, f"{name}_burst")
        return float(rate or 0), float(burst if burst is not None else rate or 0)


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


NO_BUDGET = Budget()


def resolve(tenant: dict[str, Any] | None, tier: Budget | None) -> dict[str, Any]:
    """The numbers a gateway passes to the admission script for one key."""
    limits = TenantLimits.model_validate(tenant or {})
    key = tier or NO_BUDGET
    resolved: dict[str, Any] = {
        "tenant_rate": limits.units_per_s,
        "tenant_burst": limits.burst or 0.0,
        "key_rate": key.units_per_s,
        "key_burst": key.burst or 0.0,
        "max_concurrency": limits.max_concurrency,
    }
    for owner, budget in (("tenant", limits), ("key", key)):
        for name in ("tokens", "requests"):
            rate, burst = budget.per_minute(name)
            if burst > 0:  # only buckets that exist: snapshots without text budgets stay as they were
                resolved[f"{owner}_{name}_per_min"] = rate
                resolved[f"{owner}_{name}_burst"] = burst
    return resolved
