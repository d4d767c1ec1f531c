"""Latency of the guards per message: rules-only injection screening and PII redaction.

    python benchmarks/bench_guards.py [--repeat 5]

Measures, per message, p50 / p99 / max in microseconds of

- ``screen``: the rules-only injection screen (normalise → rules; decode runs → normalise → rules),
  over every text of the guard corpus (attacks and benign) and over long messages (4 KB, 64 KB) of
  ordinary prose, prose with embedded base64, and prose full of lookalike letters;
- ``redact``: PII redaction over the same texts and over long messages with PII sprinkled in.

Single thread, after a warm-up pass; ``time.perf_counter_ns`` around each call, and per message
the best of ``--repeat`` calls (on a loaded machine the raw samples mostly measure the scheduler). Done-when 4 of
issue 17 asks for ≤ 1 ms p99 per message for rules-only screening; the summary line says whether
the corpus run meets it. Timing is never asserted in a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bastion.guards import InjectionScreen, redact

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "security" / "guard_corpus"
PROSE = (
    "The quarterly report shows steady growth in the northern region, while the southern offices "
    "kept costs flat. Please summarise the main drivers and suggest two follow-up questions for the "
    "board meeting next Tuesday. "
)
PII_LINE = "Contact jane.doe@example.com or +44 20 7946 0958, card 4111 1111 1111 1111, host 10.0.0.7. "


def _corpus() -> list[str]:
    texts = []
    for name in ("attacks.jsonl", "benign.jsonl"):
        for line in (CORPUS / name).read_text(encoding="utf-8").splitlines():
            texts.append(json.loads(line)["text"])
    return texts


def _sized(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _long_messages() -> dict[str, str]:
    rng = random.Random(7)
    lookalike = "".join(
        {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с"}.get(c, c) if rng.random() < 0.3 else c for c in PROSE
    )
    b64 = PROSE + base64.b64encode(PROSE.encode()).decode() + " "
    out = {}
    for size in (4096, 65536):
        kb = size // 1024
        out[f"prose {kb} KB"] = _sized(PROSE, size)
        out[f"prose+base64 {kb} KB"] = _sized(b64, size)
        out[f"lookalikes {kb} KB"] = _sized(lookalike, size)
        out[f"prose+pii {kb} KB"] = _sized(PROSE + PII_LINE, size)
    return out


def _measure(fn: Callable[[str], object], texts: list[str], repeat: int) -> list[float]:
    """Per message, the best of ``repeat`` timed calls (µs): scheduler noise on a shared machine
    only ever adds time, so the minimum is the message's own cost; p99 is taken over messages."""
    for t in texts[:50]:
        fn(t)
    samples = []
    for t in texts:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter_ns()
            fn(t)
            best = min(best, (time.perf_counter_ns() - start) / 1000)
        samples.append(best)
    return samples


def _row(name: str, samples: list[float]) -> str:
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
    p50 = statistics.median(samples)
    return f"{name:<34} n={len(samples):>6}  p50 {p50:>9.1f}  p99 {p99:>9.1f}  max {samples[-1]:>9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    screen = InjectionScreen()
    corpus = _corpus()
    longs = _long_messages()
    print("µs per message (p50 / p99 / max)")
    corpus_screen = _measure(screen.screen, corpus, args.repeat)
    print(_row("screen: corpus", corpus_screen[:]))
    for name, text in longs.items():
        print(_row(f"screen: {name}", _measure(screen.screen, [text] * 5, args.repeat)))
    print(_row("redact: corpus", _measure(redact, corpus, args.repeat)))
    for name, text in longs.items():
        print(_row(f"redact: {name}", _measure(redact, [text] * 5, args.repeat)))
    corpus_screen.sort()
    p99 = corpus_screen[int(0.99 * len(corpus_screen))]
    verdict = "meets" if p99 <= 1000 else "does NOT meet"
    print(f"rules-only screening, corpus p99 {p99:.0f} µs: {verdict} the 1 ms p99 target (Done-when 4)")


if __name__ == "__main__":
    main()
