"""The prompt-injection screen: normalise → rules; decode embedded runs → normalise → rules again.

An :class:`InjectionScreen` is built once per policy (rules compiled at import, the classifier
handed in) and then called per user message; it never keeps or logs a text. Its result is a
:class:`~bastion.guards.result.GuardResult` with the matched rule ids, their categories, counts
(characters stripped by kind, decoded runs by encoding) and the latency in microseconds.

The optional classifier slot takes anything with ``score(texts) -> list[float]`` (probability that
each text is an injection); :class:`OnnxClassifier` adapts an ONNX sequence classifier and a
tokenizer to it. Bastion ships no classifier: the slot, its threshold and its plumbing only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bastion.guards.decode import DecodeLimits, decode_runs
from bastion.guards.normalize import normalize, skeleton
from bastion.guards.result import Decision, GuardResult
from bastion.guards.rules import Rule, anchors_in
from bastion.guards.ruleset import RULES, SMUGGLING_MIN_CHARS, SMUGGLING_RULE

GUARD = "injection"
CLASSIFIER_RULE = "INJ-CLF-1"


class Classifier(Protocol):
    """Scores texts: for each, the probability (0–1) that it is a prompt injection."""

    def score(self, texts: Sequence[str]) -> list[float]: ...


@dataclass(frozen=True, slots=True)
class ScreenSettings:
    """How the screen acts on a hit: ``flag`` or ``block``; and the classifier threshold."""

    action: Decision = Decision.BLOCK
    classifier_threshold: float = 0.5
    decode: DecodeLimits = field(default_factory=DecodeLimits)
    max_chars: int = 262_144
    """Characters screened by the rules per message; beyond it the count ``unscreened_chars`` says
    how many were not (cap the request size at the gateway well below this)."""


class InjectionScreen:
    """Screens user messages with the rule set and, when given, a classifier."""

    def __init__(
        self,
        settings: ScreenSettings | None = None,
        *,
        rules: Sequence[Rule] = RULES,
        classifier: Classifier | None = None,
    ) -> None:
        self._settings = settings or ScreenSettings()
        if self._settings.action not in (Decision.FLAG, Decision.BLOCK):
            raise ValueError("the injection screen's action is flag or block")
        self._rules = tuple(rules)
        self._anchors = tuple(dict.fromkeys(a for r in self._rules for a in r.anchors))
        self._classifier = classifier

    def _match(self, views: Sequence[str], hits: dict[str, str], prefix: str = "") -> None:
        for view in dict.fromkeys(v for v in views if v):
            present = anchors_in(view, self._anchors)
            for rule in self._rules:
                if rule.id not in hits and rule.search(view, present):
                    hits[rule.id] = prefix + rule.category

    def matches(self, text: str) -> tuple[dict[str, str], dict[str, int]]:
        """Rule ids that match (id → category, decoded hits prefixed ``encoded:``) and counts."""
        limit = self._settings.max_chars
        norm = normalize(text[:limit])
        counts = {f"stripped_{k}": v for k, v in norm.stripped.items()}
        if len(text) > limit:
            counts["unscreened_chars"] = len(text) - limit
        hits: dict[str, str] = {}
        self._match((norm.text, norm.leet), hits)
        if norm.smuggled:
            before = len(hits)
            self._match((norm.smuggled, normalize(norm.smuggled).leet), hits, "hidden:")
            if len(hits) == before and len(norm.smuggled) >= SMUGGLING_MIN_CHARS:
                hits[SMUGGLING_RULE.id] = SMUGGLING_RULE.category
        for run in decode_runs(norm.clean, self._settings.decode):
            counts[f"decoded_{run.kind}"] = counts.get(f"decoded_{run.kind}", 0) + 1
            view = normalize(run.text)
            self._match((view.text, view.leet, view.smuggled), hits, "encoded:")
        return hits, counts

    def screen(self, text: str) -> GuardResult:
        """Screen one message; the decision is ``allow`` or this screen's action."""
        started = time.perf_counter_ns()
        hits, counts = self.matches(text)
        if self._classifier is not None:
            probability = self._classifier.score([text])[0]
            counts["classifier_permille"] = round(1000 * probability)
            if probability >= self._settings.classifier_threshold:
                hits[CLASSIFIER_RULE] = "classifier"
        decision = self._settings.action if hits else Decision.ALLOW
        categories = tuple(dict.fromkeys(c.split(":")[-1] for c in hits.values()))
        return GuardResult(
            guard=GUARD,
            decision=decision,
            latency_us=(time.perf_counter_ns() - started) // 1000,
            counts=counts,
            rules=tuple(hits),
            categories=categories,
            reason=f"matched {', '.join(hits)}" if hits else None,
        )

    def screen_messages(self, texts: Sequence[str]) -> GuardResult:
        """Screen several user messages as one decision (rule ids and counts merged)."""
        started = time.perf_counter_ns()
        results = [self.screen(t) for t in texts]
        merged = GuardResult.merge(GUARD, results)
        return merged.with_latency((time.perf_counter_ns() - started) // 1000)


class OnnxClassifier:
    """Adapts an ONNX text classifier to :class:`Classifier`.

    ``session`` is an ``onnxruntime.InferenceSession`` (or anything with its ``run``); ``encode``
    turns a batch of texts into the session's named inputs (e.g. ``input_ids`` and
    ``attention_mask`` from a Hugging Face ``tokenizers.Tokenizer``). The first output is read as
    logits ``[batch, classes]`` (softmax, class ``positive_index``) or ``[batch]``/``[batch, 1]``
    scores (sigmoid). The texts are screened after normalisation, like the rules see them.
    """

    def __init__(
        self,
        session: Any,
        encode: Callable[[Sequence[str]], dict[str, Any]],
        *,
        positive_index: int = 1,
        normalise: bool = True,
    ) -> None:
        self._session = session
        self._encode = encode
        self._positive = positive_index
        self._normalise = normalise

    def score(self, texts: Sequence[str]) -> list[float]:
        prepared = [skeleton(normalize(t).clean) for t in texts] if self._normalise else list(texts)
        outputs = self._session.run(None, self._encode(prepared))
        rows = outputs[0].tolist() if hasattr(outputs[0], "tolist") else list(outputs[0])
        return [self._probability(row) for row in rows]

    def _probability(self, row: Any) -> float:
        if isinstance(row, (int, float)):
            return 1.0 / (1.0 + math.exp(-float(row)))
        values = [float(v) for v in row]
        if len(values) == 1:
            return 1.0 / (1.0 + math.exp(-values[0]))
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return exps[self._positive] / sum(exps)
