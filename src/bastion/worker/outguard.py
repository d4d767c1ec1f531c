"""The output guards of one generation, as it streams and once it ends (``bastion.guards``).

The worker sees every token of an answer, so the output guards run here (the gateway runs the
input guards before anything is queued). Per chunk (``feed``):

- ``max_chars``: the answer is cut there and the generation ends as ``length``;
- canary (policy ``block``, the request's marker): the generation ends as ``content_filter`` as
  soon as the marker has appeared (``CanaryWatch``, across chunks, obfuscations included);
- blocked terms: checked on the answer's tail; a match ends it as ``content_filter``.

For a streamed answer, a chunk is passed on only once it cannot be the start of something a guard
would refuse: with PII-out ``redact``/``block`` the last ``PII_HOLD`` characters are held back
(cut at whitespace, never inside a value found so far) and what is passed on is redacted; with
blocked terms the last (longest term + 8) characters are; with the canary, only a tail that
could begin the marker. With none of these guards on, a chunk is passed on as it is produced.

At the end (``finish``) the whole answer is checked once more (canary, output checks, PII, and
for a non-streamed request with a ``schema``, the JSON schema): that is the decision recorded.
A refused answer (``content_filter``) keeps only what was already streamed ('' when not
streamed); so does an answer that does not match its schema (a refusal, not a failure: a client's
impossible schema must not count against the version's circuit breaker).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from bastion.guards import CanaryWatch, Decision, GuardResult, Guards, PiiMode, find_pii, guard_pii, redact
from bastion.guards.canary import check_canary
from bastion.guards.normalize import normalize
from bastion.guards.output import schema_violation
from bastion.text.jobs import FINISH_CANCELLED, FINISH_FILTER, FINISH_LENGTH, GenerationRequest

PII_HOLD = 48  # characters held back while PII-out redacts a stream: longer than any value it finds
CANARY_WINDOW = 4096  # how far back a spread-out start of the canary marker is looked for
_NOT_ALNUM = re.compile(r"[\W_]+")
_SPACE = re.compile(r"\s")


def _squash(text: str) -> str:
    return _NOT_ALNUM.sub("", normalize(text).text)


def _alnum(text: str) -> int:
    return sum(1 for ch in text if ch.isalnum())


def _alnum_back(text: str, letters: int, most: int = 8192) -> int:
    """Where the last ``letters`` letters and digits of ``text`` begin (separators, invisible
    characters and the like do not count), looking back at most ``most`` characters."""
    count = 0
    floor = max(0, len(text) - most)
    for i in range(len(text) - 1, floor - 1, -1):
        if text[i].isalnum():
            count += 1
            if count >= letters:
                return i
    return floor


@dataclass
class Ending:
    """How a generation ended, after the guards: the answer, its last chunk, the decisions."""

    text: str
    tail: str  # streamed answers: what is still to be written before the end entry
    finish: str
    results: list[GuardResult] = field(default_factory=list)


class OutputGuard:
    def __init__(self, guards: Guards | None, request: GenerationRequest) -> None:
        self.guards = guards
        self.request = request
        self.stream = request.stream
        self.raw = ""  # the answer as generated (in memory only, never logged)
        self.sent = 0  # characters of ``raw`` passed on to the stream
        self.emitted: list[str] = []
        policy = guards.policy if guards is not None else None
        self.marker = request.marker if guards is not None and guards.canary_action is not None else ""
        self.watch = (
            CanaryWatch(self.marker) if self.marker and guards and guards.canary_action is Decision.BLOCK else None
        )
        self._needle = _squash(self.marker) if self.watch is not None else ""
        self.pii = guards is not None and guards.pii_out.mode in (PiiMode.REDACT, PiiMode.BLOCK)
        terms = policy.output.blocked_terms if policy is not None else ()
        self.term_chars = max((len(t) for t in terms), default=0)
        self.hold = max(PII_HOLD if self.pii else 0, self.term_chars + 8 if terms else 0)
        self.max_chars = policy.output.max_chars if policy is not None else None

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add a chunk of the answer: what to stream now, and why to end the generation (or None)."""
        if not text:
            return "", None
        verdict = None
        self.raw += text
        if self.max_chars is not None and len(self.raw) > self.max_chars:
            text = text[: max(0, len(text) - (len(self.raw) - self.max_chars))]
            self.raw = self.raw[: self.max_chars]
            verdict = FINISH_LENGTH
        if self.watch is not None and self.watch.feed(text):
            return "", FINISH_FILTER
        if self.term_chars and self.guards is not None:
            # the new text and, before it, enough letters and digits for any term however spread
            # out (separators and invisible characters do not count)
            start = _alnum_back(self.raw, _alnum(text) + 2 * self.term_chars + 8)
            if self.guards.output.blocked_term(self.raw[start:]):
                return "", FINISH_FILTER
        if not self.stream:
            return "", verdict
        piece = self._release(final=False)
        if piece is None:
            return "", FINISH_FILTER
        return piece, verdict

    def _release(self, *, final: bool) -> str | None:
        """The next piece to stream (redacted), '' for none yet; None when PII-out blocks it."""
        unsent = self.raw[self.sent :]
        end = len(unsent) if final else self._held_end(unsent)
        findings = find_pii(unsent, self.guards.pii_out.kinds) if self.pii and self.guards is not None else []
        if not final:
            for f in findings:
                if f.start < end < f.end:
                    end = f.start
        piece = unsent[:end]
        if self.pii and self.guards is not None and any(f.end <= end for f in findings):
            if self.guards.pii_out.mode is PiiMode.BLOCK:
                return None
            piece = redact(piece, self.guards.pii_out.kinds).text
        self.sent += end
        if piece:
            self.emitted.append(piece)
        return piece

    def _held_end(self, unsent: str) -> int:
        """How much of ``unsent`` may be streamed now: not what might still turn out to be PII,
        a blocked term (by letters: its letters may be spread out) or the start of the marker."""
        end = len(unsent)
        if self.term_chars:
            end = _alnum_back(unsent, self.term_chars + 8)
        if self.pii:
            end = max(0, end - PII_HOLD)
        if self.term_chars or self.pii:
            cut = max((m.start() for m in _SPACE.finditer(unsent, 0, end)), default=-1)
            if cut >= 0:
                end = cut + 1
            elif len(unsent) < 4 * max(self.hold, 1):
                end = 0  # one long word so far: wait for its end (or for enough of it)
        if self.watch is not None:
            end = min(end, self._canary_hold(unsent))
        return end

    def _canary_hold(self, unsent: str) -> int:
        """Where a tail that might be the start of the marker begins (``len(unsent)``: none),
        however far apart its characters are spread (within ``CANARY_WINDOW`` characters). One
        normalisation per chunk; the tail is looked for only when there is one."""
        start = max(0, len(unsent) - CANARY_WINDOW)
        squashed = _squash(unsent[start:])
        longest = min(len(squashed), len(self._needle))
        held = next((k for k in range(longest, 0, -1) if self._needle.startswith(squashed[-k:])), 0)
        if not held:
            return len(unsent)
        count = 0
        for i in range(len(unsent) - 1, start - 1, -1):  # the shortest tail that squashes to those characters
            count += len(_squash(unsent[i]))
            if count >= held:
                return i
        return start

    def finish(self, finish: str, completion_tokens: int) -> Ending:
        """Check the whole answer; the ending to write and store."""
        guards, answer = self.guards, self.raw
        results: list[GuardResult] = []
        blocked = finish == FINISH_FILTER
        if guards is not None:
            if guards.canary_action is not None and self.marker:
                results.append(check_canary(answer, self.marker, guards.canary_action))
            results.append(guards.output.check(answer, tokens=completion_tokens))
            if guards.pii_out.mode is not PiiMode.OFF:
                answer, pii = guard_pii(answer, guards.pii_out)
                results.append(GuardResult.merge("pii_out", [pii]))
            blocked = blocked or any(r.blocked for r in results)
        schema = self.request.schema
        if not blocked and schema is not None and not self.stream and finish != FINISH_CANCELLED:
            started = time.perf_counter_ns()
            reason = schema_violation(answer, schema)
            results.append(_schema_result(reason, (time.perf_counter_ns() - started) // 1000))
            # a refusal, not a failure: a client asking for a schema the model cannot meet must not
            # open the version's circuit breaker for everyone (the answer ends content_filter, empty)
            blocked = reason is not None
        if blocked:
            return Ending("".join(self.emitted), "", FINISH_FILTER, results)
        if not self.stream:
            return Ending(answer, "", finish, results)
        tail = self._release(final=True)
        if tail is None:  # (PII-out block found a value only now: refused, nothing more sent)
            return Ending("".join(self.emitted), "", FINISH_FILTER, results)
        return Ending("".join(self.emitted), tail, finish, results)


def _schema_result(reason: str | None, latency_us: int) -> GuardResult:
    return GuardResult(
        guard="json_schema",
        decision=Decision.BLOCK if reason else Decision.ALLOW,
        latency_us=latency_us,
        rules=(reason.split(":")[0],) if reason else (),
        reason=reason,
    )
