"""Run the ONNX check (``bastion.artifacts.onnx_check``) in a child process with resource limits.

Parsing a protobuf can take many times the upload's size (a few megabytes of zero varints decode
to gigabytes), so the control plane never parses an upload itself. ``SandboxedCheck`` starts
``python -I -m bastion.artifacts.sandbox`` in a fresh, empty temporary working directory with a
minimal environment; the child sets its own limits (address space ``memory_mb``, CPU seconds,
a few file descriptors, no file writes, no core dumps) before it reads the artifact from stdin,
and writes its verdict as one JSON object on stdout: the signature, or the refusal's kind and
message. A child that dies, runs out of memory or time, or answers anything else is refused with
``InvalidArtifact`` ("could not be checked within its memory/time bounds", 422), never a 500.
``SandboxedCheck.text`` checks a text version's tokenizer in the same child, after the graph
(``bastion.artifacts.text_check``: a hostile tokenizer's regex can panic the Rust parser): stdin
then holds the artifact, the tokenizer and the JSON list of tokens its config names, one after
the other (their lengths are arguments), and the verdict adds ``{"tokenizer": …}``.
The parent holds only the upload's bytes; at most ``concurrency`` checks run at a time, and a
check that cannot start within ``wait_s`` (the caller's thread waits: it is a threadpool thread the
control plane's other requests need too) is refused with ``Overloaded`` (503, ``Retry-After``).
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import orjson

from bastion import logs
from bastion.artifacts import onnx_check, text_check
from bastion.errors import BastionError, InvalidArtifact, Overloaded, PayloadTooLarge
from bastion.signature import Signature

UNCHECKABLE = "the artifact could not be checked within its memory/time bounds"
BUSY = "another artifact check is running; retry"
_REFUSALS: dict[str, type[InvalidArtifact | PayloadTooLarge]] = {
    "InvalidArtifact": InvalidArtifact,
    "PayloadTooLarge": PayloadTooLarge,
}
_MAX_ANSWER_BYTES = 4 << 20
_MAX_TOKEN_LIST_BYTES = 1 << 20

log = logs.get("bastion.artifacts")


@dataclass(frozen=True)
class SandboxedCheck:
    """``onnx_check.inspect`` in a child process: ``check(data, max_bytes) -> Signature``."""

    memory_mb: int = 2048
    timeout_s: float = 60.0
    concurrency: int = 2
    wait_s: float = 5.0  # for a free slot, before the check is refused as Overloaded
    _slots: threading.BoundedSemaphore = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_slots", threading.BoundedSemaphore(self.concurrency))

    def __call__(self, data: bytes, max_bytes: int) -> Signature:
        onnx_check.precheck(data, max_bytes)  # cheap refusals without a child
        return _signature(self._run(data, _arguments(max_bytes, self)))

    def text(
        self, data: bytes, max_bytes: int, tokenizer: bytes, max_tokenizer_bytes: int, tokens: list[str]
    ) -> tuple[Signature, text_check.TokenizerReport]:
        """The graph's signature and the tokenizer's report (``TextCheck``), both from one child."""
        onnx_check.precheck(data, max_bytes)
        if len(tokenizer) > max_tokenizer_bytes:
            raise PayloadTooLarge(f"the tokenizer is {len(tokenizer)} bytes; the limit is {max_tokenizer_bytes}")
        names = orjson.dumps(tokens)
        if len(names) > _MAX_TOKEN_LIST_BYTES:
            raise InvalidArtifact("the text config names too many tokens")
        extra = [str(len(data)), str(len(tokenizer)), str(max_tokenizer_bytes)]
        answer = self._run(data + tokenizer + names, [*_arguments(max_bytes, self), *extra])
        signature = _signature(answer)
        if not isinstance(answer.get("tokenizer"), dict):
            raise InvalidArtifact(UNCHECKABLE)
        return signature, text_check.TokenizerReport.from_dict(answer["tokenizer"])

    def tokenizer(self, tokenizer: bytes, max_tokenizer_bytes: int, tokens: list[str]) -> text_check.TokenizerReport:
        """The tokenizer's report alone, from a child (a version whose artifact is no graph: an
        upstream descriptor)."""
        if len(tokenizer) > max_tokenizer_bytes:
            raise PayloadTooLarge(f"the tokenizer is {len(tokenizer)} bytes; the limit is {max_tokenizer_bytes}")
        names = orjson.dumps(tokens)
        if len(names) > _MAX_TOKEN_LIST_BYTES:
            raise InvalidArtifact("the text config names too many tokens")
        extra = ["0", str(len(tokenizer)), str(max_tokenizer_bytes)]
        answer = self._run(tokenizer + names, [*_arguments(0, self), *extra])
        if not isinstance(answer.get("tokenizer"), dict):
            _signature(answer)  # the refusal it carries
            raise InvalidArtifact(UNCHECKABLE)
        return text_check.TokenizerReport.from_dict(answer["tokenizer"])

    def _run(self, stdin: bytes, arguments: list[str]) -> dict[str, Any]:
        if not self._slots.acquire(timeout=self.wait_s):
            log.warning("artifact_check_busy", concurrency=self.concurrency, waited_s=self.wait_s)
            raise Overloaded(BUSY, retry_after=max(1, math.ceil(self.wait_s)))
        try:
            with tempfile.TemporaryDirectory(prefix="bastion-check-") as cwd:
                try:
                    done = subprocess.run(  # noqa: S603 - our own module, no shell
                        [sys.executable, "-I", "-B", "-m", "bastion.artifacts.sandbox", *arguments],
                        input=stdin,
                        capture_output=True,
                        cwd=cwd,
                        env=_environment(cwd),
                        timeout=self.timeout_s,
                        check=False,
                    )
                except subprocess.TimeoutExpired as exc:
                    log.warning("artifact_check_timed_out", timeout_s=self.timeout_s)
                    raise InvalidArtifact(UNCHECKABLE) from exc
        finally:
            self._slots.release()
        return _verdict(done)


def _arguments(max_bytes: int, check: SandboxedCheck) -> list[str]:
    return [str(max_bytes), str(check.memory_mb), str(max(1, math.ceil(check.timeout_s)))]


def _environment(cwd: str) -> dict[str, str]:
    """A minimal environment: no secrets of the control plane's, one thread per library."""
    env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "LC_ALL": "C.UTF-8"}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[name] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def _verdict(done: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    answer: Any = None
    if done.returncode == 0 and len(done.stdout) <= _MAX_ANSWER_BYTES:
        try:
            answer = orjson.loads(done.stdout)
        except orjson.JSONDecodeError:
            answer = None
    if not isinstance(answer, dict):
        log.warning(
            "artifact_check_failed",
            returncode=done.returncode,
            stdout_bytes=len(done.stdout),
            stderr_bytes=len(done.stderr),
            error=_error_name(done.stderr),
        )
        raise InvalidArtifact(UNCHECKABLE)
    return answer


def _signature(answer: dict[str, Any]) -> Signature:
    """The signature of a verdict, or the refusal it carries."""
    if "signature" in answer:
        return Signature.from_dict(answer["signature"])
    refusal = _REFUSALS.get(str(answer.get("kind")), InvalidArtifact)
    raise refusal(str(answer.get("detail") or "the artifact was refused")[:500])


def _error_name(stderr: bytes) -> str:
    """The name of the exception the child died of (its last stderr line up to the colon: never the
    message, which may quote the upload)."""
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    name = lines[-1].partition(":")[0] if lines else ""
    return name[:120] if name.replace(".", "").replace("_", "").isalnum() else "unknown"


# --- the child ---------------------------------------------------------------------------------
def _limit(memory_mb: int, cpu_s: int) -> None:
    for which, value in (
        (resource.RLIMIT_AS, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_FSIZE, 0),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, 16),
    ):
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value if which != resource.RLIMIT_CPU else value + 1))


def _read(most: int) -> bytes:
    """Stdin up to ``most`` bytes, in chunks (one ``read(most)`` would reserve ``most`` at once)."""
    chunks, held = [], 0
    while held < most:
        chunk = os.read(0, min(1 << 20, most - held))
        if not chunk:
            break
        chunks.append(chunk)
        held += len(chunk)
    return b"".join(chunks)


def main(argv: list[str]) -> int:
    """The child (everything it needs is imported before the limits apply): check the artifact
    on stdin; print ``{"signature": …}`` or ``{"kind": …, "detail": …}``."""
    max_bytes, memory_mb, cpu_s = (int(a) for a in argv[:3])
    text = [int(a) for a in argv[3:6]]  # a text version: artifact, tokenizer and limit of the tokenizer
    _limit(memory_mb, cpu_s)
    if text:
        data = _read(min(text[0], max_bytes + 1))
        tokenizer = _read(min(text[1], text[2] + 1))
        names = _read(_MAX_TOKEN_LIST_BYTES + 1)
    else:
        data = _read(max_bytes + 1)
    try:
        answer: dict[str, Any] = {}
        if not text or text[0] > 0:  # a tokenizer alone (text[0] == 0) has no graph to check
            answer["signature"] = onnx_check.inspect(data, max_bytes).to_dict()
        del data
        if text:
            tokens = orjson.loads(names) if len(names) <= _MAX_TOKEN_LIST_BYTES else None
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise InvalidArtifact("the tokens to look up are not a list of strings")
            report = text_check.inspect_tokenizer(tokenizer, tokens, max_bytes=text[2])
            answer["tokenizer"] = report.to_dict()
    except BastionError as exc:
        answer = {"kind": type(exc).__name__, "detail": exc.detail}
    except orjson.JSONDecodeError:
        answer = {"kind": "InvalidArtifact", "detail": "the tokens to look up are not JSON"}
    sys.stdout.buffer.write(orjson.dumps(answer))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
