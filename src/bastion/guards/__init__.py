"""Guards for text models: prompt-injection screen, PII redaction, canary and output checks.

Pure functions and small classes, no I/O, no global state, no network, no model download; the
gateway and the worker build them from a model's :class:`~bastion.guards.policy.GuardPolicy` and
record each :class:`~bastion.guards.result.GuardResult` (decision, latency, counts, rule ids —
never the text) in the decision log and the metrics. Modules, leaves first::

    result        GuardResult, Decision: the record every guard returns
    confusables   the lookalike → Latin table (from Unicode confusables.txt)
    normalize     NFKC, invisible characters, tag-block smuggling, confusables, casefold, leet
    decode        embedded base64 / base32 / hex / %xx / \\u escapes, bounded
    rules         Rule and the anchor index (which rules are worth trying on a text)
    ruleset       the built-in injection rules (ids, categories, patterns, anchors)
    injection     InjectionScreen, the Classifier slot, OnnxClassifier
    checksums     Luhn, IBAN mod 97, national-id check digits
    pii           find_pii, redact, guard_pii
    canary        new_marker, pin_system_prompt, canary_leaked, CanaryWatch
    output        OutputChecker: length, blocked terms, JSON schema
    policy        GuardPolicy, parse_policy, Guards
"""

from __future__ import annotations

from bastion.guards.canary import CanaryWatch, canary_leaked, check_canary, new_marker, pin_system_prompt
from bastion.guards.injection import Classifier, InjectionScreen, OnnxClassifier, ScreenSettings
from bastion.guards.normalize import Normalized, normalize
from bastion.guards.output import OutputChecker, OutputPolicy, SchemaError, check_schema
from bastion.guards.pii import PiiKind, PiiMode, PiiSettings, Redaction, find_pii, guard_pii, redact
from bastion.guards.policy import CanaryMode, GuardPolicy, Guards, InjectionMode, parse_policy
from bastion.guards.result import Decision, GuardResult

__all__ = [
    "CanaryMode",
    "CanaryWatch",
    "Classifier",
    "Decision",
    "GuardPolicy",
    "GuardResult",
    "Guards",
    "InjectionMode",
    "InjectionScreen",
    "Normalized",
    "OnnxClassifier",
    "OutputChecker",
    "OutputPolicy",
    "PiiKind",
    "PiiMode",
    "PiiSettings",
    "Redaction",
    "SchemaError",
    "ScreenSettings",
    "canary_leaked",
    "check_canary",
    "check_schema",
    "find_pii",
    "guard_pii",
    "new_marker",
    "normalize",
    "parse_policy",
    "pin_system_prompt",
    "redact",
]
