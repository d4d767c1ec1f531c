"""Output validation: maximum length, blocked terms, and a JSON schema for structured answers.

An :class:`OutputChecker` is built once from an :class:`OutputPolicy` (blocked terms normalised
and compiled) and checks each answer; the result passes (``allow``) or refuses (``block``) with a
reason that names the check, never the offending text. Blocked terms match on the normalised view
(``bastion.guards.normalize``), so lookalike letters, zero-width characters and case do not hide
them; a term matches whole words only.

The JSON-schema check (``response_format: {"type": "json_schema", ...}``) uses the ``jsonschema``
package (Draft 2020-12 unless the schema says otherwise); its reason gives the failing keyword and
the JSON path, not the value. Whether to retry or refuse on failure is the caller's policy
(:attr:`OutputPolicy.json_schema_retries`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bastion.guards.normalize import normalize, skeleton, strip_invisible
from bastion.guards.result import Decision, GuardResult

GUARD = "output"


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """Limits on an answer; ``None`` or empty turns a check off."""

    max_chars: int | None = None
    max_tokens: int | None = None
    blocked_terms: tuple[str, ...] = ()
    json_schema_retries: int = 0


class SchemaError(ValueError):
    """The JSON schema itself is not valid."""


# Keywords a client's schema may not use: those whose value is a regular expression (Python's
# ``re`` backtracks, so ``^(a+)+$`` could hold a worker for seconds per answer), and references
# (``$ref`` to another document, or to itself, fails or recurses when the answer is checked). A
# schema nested deeper than ``MAX_SCHEMA_DEPTH`` is refused too (a keyword could hide below).
REGEX_KEYWORDS = frozenset({"pattern", "patternProperties"})
REFERENCE_KEYWORDS = frozenset({"$ref", "$dynamicRef", "$recursiveRef"})
MAX_SCHEMA_DEPTH = 32
# What checking an answer may cost is bounded too: validation runs in the worker's generation loop,
# where every answer of the batch waits for it. ``uniqueItems`` is quadratic in jsonschema; a schema
# of thousands of ``anyOf`` branches multiplies the work by each.
MAX_SCHEMA_NODES = 256  # objects and lists in the schema
COSTLY_KEYWORDS = frozenset({"uniqueItems"})


def _regex_keyword(found: Any, depth: int = 0) -> str | None:
    """The first keyword of a schema that is not accepted (see above), or None."""
    if depth > MAX_SCHEMA_DEPTH:
        return f"nesting deeper than {MAX_SCHEMA_DEPTH}"
    if isinstance(found, Mapping):
        for key, value in found.items():
            if (key == "pattern" and isinstance(value, str)) or (
                key in REGEX_KEYWORDS - {"pattern"} or key in REFERENCE_KEYWORDS
            ):
                return str(key)
            if key in COSTLY_KEYWORDS and value is True:
                return str(key)
            inner = _regex_keyword(value, depth + 1)
            if inner is not None:
                return inner
    elif isinstance(found, list):
        for value in found:
            inner = _regex_keyword(value, depth + 1)
            if inner is not None:
                return inner
    return None


def _nodes(found: Any) -> int:
    """Objects and lists in a schema (stops counting past ``MAX_SCHEMA_NODES``)."""
    count, stack = 0, [found]
    while stack and count <= MAX_SCHEMA_NODES:
        item = stack.pop()
        if isinstance(item, Mapping):
            count += 1
            stack.extend(item.values())
        elif isinstance(item, list):
            count += 1
            stack.extend(item)
    return count


def check_schema(schema: Mapping[str, Any]) -> None:
    """Raise :class:`SchemaError` when ``schema`` is not a valid JSON schema, or uses a regular
    expression keyword (``pattern``, ``patternProperties``: see ``REGEX_KEYWORDS``); call at
    request time."""
    import jsonschema  # type: ignore[import-untyped]  # imported on first use: only JSON-schema answers need it

    if _nodes(schema) > MAX_SCHEMA_NODES:
        raise SchemaError(f"JSON schemas of more than {MAX_SCHEMA_NODES} objects and lists are not accepted")
    keyword = _regex_keyword(schema)
    if keyword is not None:
        raise SchemaError(
            f"JSON schemas with {keyword!r} are not accepted (regular expressions, references and costly "
            "keywords are not evaluated; nesting is bounded)"
        )
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise SchemaError(f"invalid JSON schema: {exc.message}") from None


def schema_violation(answer: str, schema: Mapping[str, Any]) -> str | None:
    """Why ``answer`` does not satisfy ``schema`` (keyword and path only), or ``None`` if it does."""
    import jsonschema  # type: ignore[import-untyped]

    try:
        instance = json.loads(answer)
    except (ValueError, RecursionError):
        return "json_invalid: the answer is not JSON"
    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    except Exception:  # (RecursionError too) a schema the validator cannot use: the answer is refused
        return "json_schema: the schema could not be evaluated"
    if error is None:
        return None
    # the keyword and the depth only: a path would name keys of the answer, which is the model's text
    return f"json_schema: {error.validator} failed at depth {len(error.absolute_path)}"


class OutputChecker:
    """Checks answers against one :class:`OutputPolicy`."""

    def __init__(self, policy: OutputPolicy) -> None:
        self.policy = policy
        terms = [skeleton(strip_invisible(t)[0]) for t in policy.blocked_terms]
        terms = [t for t in terms if t]
        self._terms = (
            re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t).replace(r"\ ", r"[\W_]*") for t in terms) + r")(?!\w)")
            if terms
            else None
        )

    def blocked_term(self, answer: str) -> bool:
        """Whether a blocked term appears in ``answer`` (normalised, whole words)."""
        if self._terms is None:
            return False
        view = normalize(answer)
        return any(self._terms.search(v) for v in (view.text, view.leet, view.smuggled) if v)

    def violation(
        self, answer: str, *, tokens: int | None = None, schema: Mapping[str, Any] | None = None
    ) -> str | None:
        """The first failed check's reason, or ``None``. ``tokens`` is the answer's token count."""
        p = self.policy
        if p.max_chars is not None and len(answer) > p.max_chars:
            return f"max_chars: {len(answer)} > {p.max_chars}"
        if p.max_tokens is not None and tokens is not None and tokens > p.max_tokens:
            return f"max_tokens: {tokens} > {p.max_tokens}"
        if self.blocked_term(answer):
            return "blocked_term: the answer contains a blocked term"
        if schema is not None:
            return schema_violation(answer, schema)
        return None

    def check(self, answer: str, *, tokens: int | None = None, schema: Mapping[str, Any] | None = None) -> GuardResult:
        """Pass (``allow``) or refuse (``block``) one answer, with the reason."""
        started = time.perf_counter_ns()
        reason = self.violation(answer, tokens=tokens, schema=schema)
        return GuardResult(
            guard=GUARD,
            decision=Decision.BLOCK if reason else Decision.ALLOW,
            latency_us=(time.perf_counter_ns() - started) // 1000,
            rules=(reason.split(":")[0],) if reason else (),
            reason=reason,
        )
