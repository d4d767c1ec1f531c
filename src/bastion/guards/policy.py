"""Per-model guard policy: what each guard does, parsed and validated from the admin API's dict.

The policy dict (admin API, CLI ``bastion models guards NAME ...``, the snapshot)::

    {
      "injection": "off" | "flag" | "block",
      "injection_threshold": 0.5,          # classifier probability at or above which it counts
      "pii_in": "off" | "flag" | "redact" | "block",
      "pii_out": "off" | "flag" | "redact" | "block",
      "pii_kinds": ["email", "phone", "card", "iban", "ip", "national_id"],
      "canary": "off" | "flag" | "block",
      "output": {"max_chars": 20000, "max_tokens": null, "blocked_terms": ["..."],
                 "json_schema_retries": 0}
    }

Every key is optional (the defaults turn every guard off); an unknown key or a wrong value is an
:class:`~bastion.errors.InvalidInput` whose detail names the key and the allowed values.
:class:`Guards` turns a policy into the ready-built guards the gateway calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, TypeVar

from bastion.errors import InvalidInput
from bastion.guards.canary import check_canary
from bastion.guards.injection import Classifier, InjectionScreen, ScreenSettings
from bastion.guards.output import OutputChecker, OutputPolicy
from bastion.guards.pii import ALL_KINDS, PiiKind, PiiMode, PiiSettings, guard_pii
from bastion.guards.result import Decision, GuardResult


class InjectionMode(StrEnum):
    OFF = "off"
    FLAG = "flag"
    BLOCK = "block"


class CanaryMode(StrEnum):
    OFF = "off"
    FLAG = "flag"
    BLOCK = "block"


_E = TypeVar("_E", bound=StrEnum)

MAX_BLOCKED_TERMS: Final = 1000
MAX_TERM_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """One model's guard policy. The default turns every guard off."""

    injection: InjectionMode = InjectionMode.OFF
    injection_threshold: float = 0.5
    pii_in: PiiMode = PiiMode.OFF
    pii_out: PiiMode = PiiMode.OFF
    pii_kinds: frozenset[PiiKind] = ALL_KINDS
    canary: CanaryMode = CanaryMode.OFF
    output: OutputPolicy = field(default_factory=OutputPolicy)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape :func:`parse_policy` reads (round-trips)."""
        return {
            "injection": str(self.injection),
            "injection_threshold": self.injection_threshold,
            "pii_in": str(self.pii_in),
            "pii_out": str(self.pii_out),
            "pii_kinds": sorted(str(k) for k in self.pii_kinds),
            "canary": str(self.canary),
            "output": {
                "max_chars": self.output.max_chars,
                "max_tokens": self.output.max_tokens,
                "blocked_terms": list(self.output.blocked_terms),
                "json_schema_retries": self.output.json_schema_retries,
            },
        }


_KEYS: Final = frozenset({"injection", "injection_threshold", "pii_in", "pii_out", "pii_kinds", "canary", "output"})
_OUTPUT_KEYS: Final = frozenset({"max_chars", "max_tokens", "blocked_terms", "json_schema_retries"})


def _enum(kind: type[_E], key: str, value: object) -> _E:
    allowed = ", ".join(m.value for m in kind)
    if not isinstance(value, str):
        raise InvalidInput(f"guard policy: {key} must be one of {allowed}", key=key)
    try:
        return kind(value.lower())
    except ValueError:
        raise InvalidInput(f"guard policy: {key} must be one of {allowed}, not {value[:40]!r}", key=key) from None


def _limit(key: str, value: object, *, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidInput(f"guard policy: {key} must be null or an integer from {minimum} to {maximum}", key=key)
    return value


def _output(data: object) -> OutputPolicy:
    if not isinstance(data, Mapping):
        raise InvalidInput("guard policy: output must be an object", key="output")
    unknown = sorted(set(data) - _OUTPUT_KEYS)
    if unknown:
        raise InvalidInput(
            f"guard policy: unknown output key(s) {', '.join(map(str, unknown))}; "
            f"known: {', '.join(sorted(_OUTPUT_KEYS))}",
            key="output",
        )
    terms = data.get("blocked_terms", [])
    if (
        not isinstance(terms, list)
        or len(terms) > MAX_BLOCKED_TERMS
        or not all(isinstance(t, str) and 0 < len(t.strip()) <= MAX_TERM_CHARS for t in terms)
    ):
        raise InvalidInput(
            f"guard policy: output.blocked_terms must be a list of at most {MAX_BLOCKED_TERMS} non-empty strings "
            f"of at most {MAX_TERM_CHARS} characters",
            key="output.blocked_terms",
        )
    retries = _limit("output.json_schema_retries", data.get("json_schema_retries", 0), minimum=0, maximum=3)
    return OutputPolicy(
        max_chars=_limit("output.max_chars", data.get("max_chars"), minimum=1, maximum=10_000_000),
        max_tokens=_limit("output.max_tokens", data.get("max_tokens"), minimum=1, maximum=10_000_000),
        blocked_terms=tuple(terms),
        json_schema_retries=retries or 0,
    )


def parse_policy(data: Mapping[str, object]) -> GuardPolicy:
    """Validate a policy dict (see the module docstring); raise ``InvalidInput`` with a clear detail."""
    if not isinstance(data, Mapping):
        raise InvalidInput("guard policy must be an object")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise InvalidInput(
            f"guard policy: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(sorted(_KEYS))}"
        )
    threshold = data.get("injection_threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InvalidInput("guard policy: injection_threshold must be a number from 0 to 1", key="injection_threshold")
    kinds_raw = data.get("pii_kinds", sorted(ALL_KINDS))
    if not isinstance(kinds_raw, list) or not kinds_raw:
        raise InvalidInput("guard policy: pii_kinds must be a non-empty list", key="pii_kinds")
    return GuardPolicy(
        injection=_enum(InjectionMode, "injection", data.get("injection", "off")),
        injection_threshold=float(threshold),
        pii_in=_enum(PiiMode, "pii_in", data.get("pii_in", "off")),
        pii_out=_enum(PiiMode, "pii_out", data.get("pii_out", "off")),
        pii_kinds=frozenset(_enum(PiiKind, "pii_kinds", k) for k in kinds_raw),
        canary=_enum(CanaryMode, "canary", data.get("canary", "off")),
        output=_output(data.get("output", {})),
    )


@dataclass(frozen=True, slots=True)
class Guards:
    """The guards of one policy, built once (per snapshot) and shared by every request."""

    policy: GuardPolicy
    screen: InjectionScreen | None
    pii_in: PiiSettings
    pii_out: PiiSettings
    output: OutputChecker
    canary_action: Decision | None

    @classmethod
    def build(cls, policy: GuardPolicy, *, classifier: Classifier | None = None) -> Guards:
        screen = None
        if policy.injection is not InjectionMode.OFF:
            action = Decision.BLOCK if policy.injection is InjectionMode.BLOCK else Decision.FLAG
            screen = InjectionScreen(
                ScreenSettings(action=action, classifier_threshold=policy.injection_threshold),
                classifier=classifier,
            )
        canary = {CanaryMode.OFF: None, CanaryMode.FLAG: Decision.FLAG, CanaryMode.BLOCK: Decision.BLOCK}
        return cls(
            policy=policy,
            screen=screen,
            pii_in=PiiSettings(policy.pii_in, policy.pii_kinds),
            pii_out=PiiSettings(policy.pii_out, policy.pii_kinds),
            output=OutputChecker(policy.output),
            canary_action=canary[policy.canary],
        )

    def check_input(self, messages: Sequence[str]) -> tuple[list[str], list[GuardResult]]:
        """Screen and (per policy) redact the user's messages before anything is queued.

        Returns the messages to pass on and one result per guard that ran (injection first); the
        request is refused when any result is ``block``.
        """
        results: list[GuardResult] = []
        if self.screen is not None:
            results.append(self.screen.screen_messages(messages))
        out = list(messages)
        if self.pii_in.mode is not PiiMode.OFF:
            pii: list[GuardResult] = []
            for i, text in enumerate(out):
                out[i], result = guard_pii(text, self.pii_in)
                pii.append(result)
            results.append(GuardResult.merge("pii_in", pii))
        return out, results

    def check_output(
        self,
        answer: str,
        *,
        marker: str | None = None,
        tokens: int | None = None,
        schema: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[GuardResult]]:
        """Check a whole answer: canary (when ``marker`` is given and the policy watches it),
        output checks, then PII. Returns the answer to send (redacted per policy) and the results."""
        results: list[GuardResult] = []
        if self.canary_action is not None and marker is not None:
            results.append(check_canary(answer, marker, self.canary_action))
        results.append(self.output.check(answer, tokens=tokens, schema=schema))
        if self.pii_out.mode is not PiiMode.OFF:
            answer, result = guard_pii(answer, self.pii_out)
            results.append(GuardResult.merge("pii_out", [result]))
        return answer, results
