"""The record every guard returns: what the decision log and the metrics carry.

A result holds no text from the message: the guard's name, its decision, its latency in
microseconds, counts by kind (characters stripped, runs decoded, values redacted), the ids and
categories of the rules that matched, and a short reason built from those ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Decision(StrEnum):
    """What a guard decided; ordered from the mildest to the strictest."""

    ALLOW = "allow"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Decision.ALLOW: 0, Decision.FLAG: 1, Decision.REDACT: 2, Decision.BLOCK: 3}


@dataclass(frozen=True, slots=True)
class GuardResult:
    """One guard's decision on one message (or one answer)."""

    guard: str
    decision: Decision
    latency_us: int
    counts: Mapping[str, int] = field(default_factory=dict)
    rules: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "counts", MappingProxyType(dict(self.counts)))

    @property
    def blocked(self) -> bool:
        return self.decision is Decision.BLOCK

    def with_latency(self, latency_us: int) -> GuardResult:
        return replace(self, latency_us=latency_us)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape for the decision log (never any text of the message)."""
        out: dict[str, Any] = {"guard": self.guard, "decision": str(self.decision), "latency_us": self.latency_us}
        if self.counts:
            out["counts"] = dict(self.counts)
        if self.rules:
            out["rules"] = list(self.rules)
        if self.categories:
            out["categories"] = list(self.categories)
        if self.reason:
            out["reason"] = self.reason
        return out

    @staticmethod
    def merge(guard: str, results: Iterable[GuardResult]) -> GuardResult:
        """One result for several messages: the strictest decision, summed counts, all rule ids."""
        decision = Decision.ALLOW
        latency = 0
        counts: dict[str, int] = {}
        rules: dict[str, None] = {}
        categories: dict[str, None] = {}
        reasons: list[str] = []
        for r in results:
            if r.decision.rank > decision.rank:
                decision = r.decision
            latency += r.latency_us
            for k, v in r.counts.items():
                counts[k] = counts.get(k, 0) + v
            rules.update(dict.fromkeys(r.rules))
            categories.update(dict.fromkeys(r.categories))
            if r.reason and r.reason not in reasons:
                reasons.append(r.reason)
        return GuardResult(
            guard, decision, latency, counts, tuple(rules), tuple(categories), "; ".join(reasons) or None
        )
