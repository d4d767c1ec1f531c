"""Check a text version's tokenizer (a Hugging Face ``tokenizers`` JSON) beside its ONNX graph.

``inspect_tokenizer`` is the pure checker: ``bastion.text.tokenizer.check_tokenizer_json`` (size,
JSON shape, model type, vocabulary bound, the Rust parser), then the tokens the version's config
names are looked up, and a short sample is encoded both ways (special tokens as text and matched),
so that a tokenizer whose pre-tokeniser regex panics on ordinary text is refused now, not at the
first request. The Rust side raises ``pyo3_runtime.PanicException`` (a ``BaseException``) on odd
input: anything but ``KeyboardInterrupt``/``SystemExit`` becomes ``InvalidArtifact``.

Like the ONNX check, the control plane runs it in the sandboxed child
(``bastion.artifacts.sandbox.SandboxedCheck.text``): a hostile tokenizer costs the child's bounded
memory and time, never the control plane's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bastion.artifacts import onnx_check
from bastion.errors import BastionError, InvalidArtifact, PayloadTooLarge
from bastion.signature import Signature
from bastion.text.tokenizer import MAX_TOKENIZER_BYTES, load_tokenizer

SAMPLE = "Hello, world! 123 <|end|> [SEP] naïve café 日本語 \u00a0\t\n"
MAX_TOKENS = 256  # tokens a config may name (special and stop tokens), each at most MAX_TOKEN_CHARS
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True, slots=True)
class TokenizerReport:
    """What the check found: the vocabulary size and which named tokens are not in it."""

    vocab_size: int
    missing: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "missing": list(self.missing)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerReport:
        return cls(int(data["vocab_size"]), tuple(str(t) for t in data.get("missing") or ()))


# A tokenizer's regular expressions (pre-tokenizer splits, normalizer replacements) run on every
# request's text at the gateway, holding the interpreter while they do: one that backtracks on
# some input (``(?:a|a){18}(?!a)`` on a run of ``a``) would stall a gateway for seconds per
# request. Registration times the tokenizer on runs of each kind of character and on mixed text
# and refuses one that is far slower than tokenizers are (about 1 µs a character of CPU time).
PROBE_CHARS = 2048  # characters per probe
PROBE_LIMIT_S = 0.2  # one probe taking longer (about 100 µs a character) refuses the tokenizer
_PROBE_ALPHABET = [chr(c) for c in range(0x20, 0x7F)] + list("\t\nàéßøΩжא中日한🙂\u0301\u200b\u00a0")


def _probes() -> list[str]:
    runs = [ch * PROBE_CHARS for ch in _PROBE_ALPHABET]
    pairs = [(a + b) * (PROBE_CHARS // 2) for a, b in ("ab", "a ", "1,", "a'", "'s", ". ", "aA", "a1", "\r\n")]
    mixed = [(SAMPLE + " ") * (PROBE_CHARS // (len(SAMPLE) + 1))]
    return [*runs, *pairs, *mixed]


LONG_PROBE_FACTOR = 8  # the same probes again at 8 times the length, to see how the cost grows
LONG_PROBE_LIMIT_S = 0.5  # one long probe taking longer (about 30 µs a character) refuses it
LONG_PROBE_GROWTH = 24  # a long probe costing this many times its short one: super-linear


def _timed(tokenizer: Any, probe: str) -> float:
    """The CPU time (this process's, every thread) of encoding ``probe``: on a loaded machine the
    wall-clock time of the same work grows several times over, and a sound tokenizer (the demo's,
    in CI) was refused."""
    started = time.process_time()
    tokenizer.encode(probe)
    return time.process_time() - started


def _slow(probe: str, elapsed: float, why: str) -> InvalidArtifact:
    kind = f"U+{ord(probe[0]):04X}" if len(set(probe)) == 1 else "mixed text"
    return InvalidArtifact(
        f"the tokenizer is too slow: {elapsed * 1e6 / len(probe):.1f} µs a character on {len(probe)} characters "
        f"of {kind} ({why}); its regular expressions backtrack"
    )


def _probe_speed(tokenizer: Any) -> None:
    """``InvalidArtifact`` when encoding one probe takes longer than ``PROBE_LIMIT_S``, or when the
    probes that took longest cost super-linearly more at ``LONG_PROBE_FACTOR`` times their length
    (a quadratic pattern such as ``\\w+(?=\\d)`` is fast on short runs)."""
    costs: list[tuple[float, str]] = []
    for probe in _probes():
        elapsed = _timed(tokenizer, probe)
        if elapsed > PROBE_LIMIT_S:
            raise _slow(probe, elapsed, f"at most {PROBE_LIMIT_S * 1e6 / PROBE_CHARS:.0f} µs a character")
        costs.append((elapsed, probe))
    for short, probe in sorted(costs, reverse=True)[:8]:  # the dearest probes, and mixed text
        longer = probe * LONG_PROBE_FACTOR
        elapsed = _timed(tokenizer, longer)
        # (growth alone is no verdict on a fast probe: byte-level BPE on a 64 KiB word of emoji grows
        # about 30 times in 30 ms, and short timings are noisy)
        if elapsed > LONG_PROBE_LIMIT_S or (elapsed > 0.15 and elapsed > LONG_PROBE_GROWTH * max(short, 1e-6)):
            raise _slow(longer, elapsed, f"{elapsed / max(short, 1e-6):.0f} times the cost of 1/{LONG_PROBE_FACTOR}")


def inspect_tokenizer(
    data: bytes, tokens: Sequence[str] = (), *, max_bytes: int = MAX_TOKENIZER_BYTES
) -> TokenizerReport:
    """Check ``data`` is a loadable tokenizer; report its vocabulary size and the ``tokens``
    (special and stop tokens a config names) it lacks. ``InvalidArtifact`` for a bad tokenizer."""
    if len(tokens) > MAX_TOKENS or any(len(t) > MAX_TOKEN_CHARS for t in tokens):
        raise InvalidArtifact(f"a text config names at most {MAX_TOKENS} tokens of {MAX_TOKEN_CHARS} characters")
    try:
        tokenizer = load_tokenizer(data, max_bytes=max_bytes)
        tokenizer.encode(SAMPLE)
        tokenizer.encode(SAMPLE, split_special=True, add_special_tokens=True)
        _probe_speed(tokenizer)
        missing = tuple(t for t in dict.fromkeys(tokens) if tokenizer.token_to_id(t) is None)
        return TokenizerReport(tokenizer.vocab_size, missing)
    except BastionError:
        raise
    except BaseException as exc:  # pyo3 PanicException (a BaseException) and whatever else the parser raises
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise InvalidArtifact(f"the tokenizer fails on ordinary text ({type(exc).__name__})") from None


def inspect_text(
    data: bytes, max_bytes: int, tokenizer: bytes, max_tokenizer_bytes: int, tokens: list[str]
) -> tuple[Signature, TokenizerReport]:
    """The in-process text check (``SandboxedCheck.text`` runs the same in a child): the graph's
    signature and the tokenizer's report."""
    if len(tokenizer) > max_tokenizer_bytes:
        raise PayloadTooLarge(f"the tokenizer is {len(tokenizer)} bytes; the limit is {max_tokenizer_bytes}")
    signature = onnx_check.inspect(data, max_bytes)
    return signature, inspect_tokenizer(tokenizer, tokens, max_bytes=max_tokenizer_bytes)
