"""A screening rule and the anchor index that decides which rules are worth trying on a view.

A :class:`Rule` is a stable id, a category, one compiled regular expression written against the
*normalised* view (``bastion.guards.normalize``) and its anchors: substrings of which at least one
occurs in any text the pattern matches. The screen computes once per view which anchors occur
(:func:`anchors_in`) and tries only the rules that have one; a long view is searched only in
windows around the anchors' occurrences, so screening cost grows with what the text contains, not
with the number of rules times its length. The built-in rules are in ``bastion.guards.ruleset``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+")
_SHORT = 8
_DIRECT = 2048


@dataclass(frozen=True, slots=True)
class Rule:
    """One screening rule: a stable id, its category, the compiled pattern and its anchors.

    ``anchors`` are substrings of which at least one occurs in any text the pattern matches; the
    screen tries the (slower) pattern only where an anchor occurs. An empty tuple means "always".
    """

    id: str
    category: str
    pattern: re.Pattern[str]
    anchors: tuple[str, ...] = ()

    def search(self, view: str, present: frozenset[str] | None = None, window: int = 2048) -> bool:
        """Whether the rule matches ``view``; ``present`` is :func:`anchors_in` of the view.

        A rule none of whose anchors is present is not tried; a long view is searched only in
        windows around its anchors' occurrences.
        """
        if not self.anchors:
            return self.pattern.search(view) is not None
        if present is None:
            present = anchors_in(view, self.anchors)
        here = [a for a in self.anchors if a in present]
        if not here:
            return False
        if len(view) <= window:
            return self.pattern.search(view) is not None
        spans: list[tuple[int, int]] = []
        for anchor in here:
            at = view.find(anchor)
            while at != -1:
                spans.append((max(0, at - window // 4), at + window))
                at = view.find(anchor, at + window // 2)
        spans.sort()
        end = -1
        for lo, hi in spans:
            if hi <= end:
                continue
            if self.pattern.search(view, lo, hi) is not None:
                return True
            end = hi
        return False


def anchors_in(view: str, anchors: Iterable[str]) -> frozenset[str]:
    """The anchors that occur in ``view``.

    Short views are searched directly. For long ones, short words (runs of letters and digits)
    are indexed by their prefixes and longer ones — which may be several words glued together
    once invisible separators are stripped — searched inside, so the view is read once, not once
    per anchor; anchors with other characters are searched in the view.
    """
    if len(view) <= _DIRECT:
        return frozenset(a for a in anchors if a in view)
    prefixes: set[str] = set()
    glued: list[str] = []
    for word in set(_WORD.findall(view)):
        if len(word) > _SHORT:
            glued.append(word)
        else:
            prefixes.update(word[:n] for n in range(1, len(word) + 1))
    long_words = " ".join(glued)
    return frozenset(
        a
        for a in anchors
        if (a in view if not a.isalnum() else a in prefixes or (bool(long_words) and a in long_words))
    )
