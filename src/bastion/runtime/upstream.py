"""The upstream runtime: generation forwarded to an OpenAI-compatible server (vLLM, llama.cpp, Ollama,
another Bastion) inside the private network.

``UpstreamGeneration`` has the interface the worker steps a ``BatchedGeneration`` through (``add``,
``step``, ``busy``), so everything around a generation stays the worker's: chunks into ``s:{job}``,
cancel flags, output guards, the decision log, token settlement. Each request is one streaming
``POST {url}/completions`` run by a thread of its own (at most ``max_batch`` at once, counting those
still closing), with:

- ``prompt``: the prompt's token ids decoded with their special tokens kept (the chat template the
  gateway rendered, pinned system prompt and canary marker included), ``max_tokens`` (the request's,
  cut to the context the prompt leaves), ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``
  and ``stream_options.include_usage``;
- the key from the worker's environment variable the descriptor names, as a Bearer header;
- no proxy from the environment, no redirect followed, no ``.netrc``: the request goes to the
  address in the descriptor, which must be in ``BASTION_UPSTREAM_HOSTS``, or the job fails.

The thread parses the server-sent events and queues what they say; ``step`` never waits for the
network: it drains what has arrived into one ``Delta`` per request. A request runs at most
``max_duration_s`` (the worker's ``max_job_s``), keep-alives or not. Usage is the server's last chunk's
when it sends one (completion tokens, but never fewer than the answer's text counts with the
version's tokenizer, nor more than were reserved; prompt tokens are the worker's own count, the one
the budget reserved), else the completion's tokens counted with that tokenizer. A cancelled request
(its ``cancelled()`` turned true) ends at once, and its connection is shut down, which is how the
server learns that its client went away. A failure (refused connection, an HTTP error status, a
timeout, a malformed or oversized stream) ends that request alone, with a ``Delta.error`` that says
what happened and quotes at most ``EXCERPT_CHARS`` of the server's own error message (never the key,
never more of its body); the log has the kind of failure only.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from bastion import logs
from bastion.errors import InvalidInput, JobFailed
from bastion.text.config import GenerationConfig
from bastion.text.generation import Delta, SamplingParams, Usage, check_prompt, check_token_ids
from bastion.text.jobs import FINISH_CANCELLED, FINISH_FILTER, FINISH_LENGTH, FINISH_STOP
from bastion.text.tokenizer import TextTokenizer
from bastion.text.upstream import UpstreamConfig

log = logs.get("bastion.worker")

EXCERPT_CHARS = 200  # of the server's error message, quoted in a failed job's error
MAX_LINE_BYTES = 1 << 20  # one server-sent event line
MAX_STREAM_BYTES = 64 << 20  # one answer's whole stream
CONNECT_TIMEOUT_S = 10.0
_FINISHES = {FINISH_STOP: FINISH_STOP, FINISH_LENGTH: FINISH_LENGTH, FINISH_FILTER: FINISH_FILTER}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class _Failure(Exception):
    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.message, self.kind = message, kind


@dataclass
class _Request:
    key: Hashable
    prompt_ids: list[int]
    params: SamplingParams
    budget: int
    cancelled: Callable[[], bool]
    prompt: str  # the ids decoded, special tokens kept: what the server is sent
    events: queue.SimpleQueue[tuple[Any, ...]] = field(default_factory=queue.SimpleQueue)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = 0.0  # time.monotonic() when its thread started
    text: str = ""  # the completion so far, as the server sent it
    tokens: int = 0  # its tokens, counted here
    server_tokens: int | None = None  # the server's own count (its usage chunk)
    finish: str | None = None
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.stop.is_set():
                _shutdown(sock)

    def abort(self) -> None:
        """Stop reading, and shut the connection down (a read blocked on it returns at once)."""
        with self._lock:
            self.stop.set()
            _shutdown(self._sock)


def _shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class UpstreamGeneration:
    """Generations forwarded to one upstream server, stepped like ``BatchedGeneration``."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        tokenizer: TextTokenizer,
        config: GenerationConfig,
        *,
        allowed: frozenset[str],
        max_batch: int = 16,
        arrived: threading.Event | None = None,
        environ: Mapping[str, str] = os.environ,
        max_duration_s: float = 3600.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.upstream, self._tokenizer, self._config = upstream, tokenizer, config
        self.allowed = allowed
        self.max_batch = max_batch
        self._arrived = arrived or threading.Event()
        self._environ = environ
        self.max_duration_s = max_duration_s  # a server that trickles (or sends keep-alives) forever
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._closing: list[_Request] = []  # ended here, their thread not yet gone
        timeout = httpx.Timeout(upstream.timeout_s, connect=min(upstream.timeout_s, CONNECT_TIMEOUT_S))
        self._client = httpx.Client(
            timeout=timeout,
            trust_env=False,  # no proxy, no .netrc: only the address the descriptor names
            follow_redirects=False,
            limits=httpx.Limits(max_connections=max_batch, max_keepalive_connections=max_batch),
            headers={"Accept": "text/event-stream", "User-Agent": "bastion-worker"},
        )

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def ready(self) -> bool:
        """Something for ``step`` to do now (arrived events, a request to start, one cancelled)."""
        return any(not r.events.empty() or r.cancelled() for r in self._running) or (
            bool(self._waiting) and self._threads() < self.max_batch
        )

    # joining ---------------------------------------------------------------------------------
    def add(
        self,
        key: Hashable,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Queue a request; ``JobFailed`` at once for an upstream this worker may not reach,
        ``InvalidInput`` for a prompt that leaves no room."""
        if any(r.key == key for r in (*self._waiting, *self._running)):
            raise ValueError(f"a generation with key {key!r} is already in the batch")
        if self.upstream.host not in self.allowed:
            raise JobFailed(
                f"the upstream {self.upstream.host} is not one this worker may forward to "
                "(BASTION_UPSTREAM_HOSTS); the version is not served here"
            )
        self._key()  # a missing key fails now, not in the thread
        budget = check_prompt(prompt_ids, params, self._config)
        check_token_ids(prompt_ids, self._tokenizer)
        try:
            prompt = self._tokenizer.decode(list(prompt_ids), skip_special=False)
            forged = not self._tokenizer.markers_survive_as_text(prompt_ids)
        except BaseException as exc:  # a hostile tokenizer's panic
            if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
            raise InvalidInput("the prompt's token ids do not decode") from None
        if forged:  # (the gateway refuses these first; this holds for a job queued otherwise)
            raise InvalidInput("the prompt holds text the upstream would read as control tokens; it is not forwarded")
        self._waiting.append(_Request(key, list(prompt_ids), params, budget, cancelled or (lambda: False), prompt))

    def _key(self) -> str | None:
        name = self.upstream.api_key_env
        if name is None:
            return None
        key = self._environ.get(name)
        if not key:
            raise JobFailed(f"the worker has no upstream key: its environment variable {name} is not set")
        return key

    # stepping --------------------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, Delta]]:
        """What arrived for each running request since the last step; then start waiting ones."""
        out: list[tuple[Hashable, Delta]] = []
        self._closing = [r for r in self._closing if r.thread is not None and r.thread.is_alive()]
        for request in list(self._running):
            if request.cancelled():
                self._end(request)
                out.append((request.key, Delta("", (), FINISH_CANCELLED, self._usage(request, final=False))))
                continue
            delta = self._drain(request)
            if delta is None and time.monotonic() - request.started > self.max_duration_s:
                self._end(request)
                message = f"the upstream {self.upstream.host} took longer than {self.max_duration_s:g} s"
                log.warning("upstream_failed", job_id=str(request.key), upstream=self.upstream.host, kind="duration")
                delta = Delta("", (), FINISH_STOP, self._usage(request, final=False), error=message)
            if delta is not None:
                out.append((request.key, delta))
        while self._waiting and self._threads() < self.max_batch:
            request = self._waiting.pop(0)
            if request.cancelled():
                out.append((request.key, Delta("", (), FINISH_CANCELLED, Usage(len(request.prompt_ids), 0))))
                continue
            self._start(request)
        return out

    def _threads(self) -> int:
        return len(self._running) + sum(1 for r in self._closing if r.thread is not None and r.thread.is_alive())

    def _start(self, request: _Request) -> None:
        request.thread = threading.Thread(
            target=self._forward, args=(request,), name=f"upstream-{self.upstream.host}", daemon=True
        )
        self._running.append(request)
        request.started = time.monotonic()
        request.thread.start()

    def _end(self, request: _Request) -> None:
        request.abort()
        self._running.remove(request)
        self._closing.append(request)

    def _drain(self, request: _Request) -> Delta | None:
        pieces: list[str] = []
        while True:
            try:
                event = request.events.get_nowait()
            except queue.Empty:
                break
            kind = event[0]
            if kind == "text":
                pieces.append(event[1])
            elif kind == "usage":
                request.server_tokens = event[1]
            elif kind == "finish":
                request.finish = event[1]
            elif kind == "error":
                self._end(request)
                return Delta("", (), FINISH_STOP, self._usage(request, final=False), error=event[1])
            elif kind == "done":
                text = "".join(pieces)
                self._count(request, text)
                self._end(request)
                return Delta(text, (), request.finish or FINISH_STOP, self._usage(request, final=True))
        if not pieces:
            return None
        text = "".join(pieces)
        ids = self._count(request, text)
        if request.tokens > 2 * request.budget + 16:  # a server that ignores max_tokens
            self._end(request)
            return Delta(text, ids, FINISH_LENGTH, self._usage(request, final=False))
        return Delta(text, ids)

    def _count(self, request: _Request, text: str) -> tuple[int, ...]:
        request.text += text
        if not text:
            return ()
        ids = self._ids(text)
        request.tokens += len(ids)
        return ids

    def _usage(self, request: _Request, *, final: bool) -> Usage:
        completion = request.tokens
        if final and request.text:
            completion = len(self._ids(request.text))
        if final and request.server_tokens is not None:
            # the server's count, but never below what the answer's own text counts here, nor above
            # the budget reserved: a server reporting 0 cannot get the reservation refunded
            completion = min(max(request.server_tokens, completion), request.budget)
        return Usage(len(request.prompt_ids), completion)

    def _ids(self, text: str) -> tuple[int, ...]:
        """The tokens of ``text`` (the count of its characters should the tokenizer panic)."""
        try:
            return tuple(self._tokenizer.encode(text))
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
                raise
            return tuple(range(len(text)))

    def close(self) -> None:
        """End every request (as a worker does when the engine is dropped) and the connections."""
        for request in (*self._running, *self._waiting):
            request.abort()
        self._running, self._waiting = [], []
        self._client.close()

    # the request's thread ----------------------------------------------------------------------
    def _forward(self, request: _Request) -> None:
        try:
            self._exchange(request)
            request.events.put(("done",))
        except BaseException as exc:  # never a thread's traceback on stderr, never a hung job
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            failed = exc if isinstance(exc, _Failure) else self._failure(exc, request)
            if not request.stop.is_set():
                log.warning("upstream_failed", job_id=str(request.key), upstream=self.upstream.host, kind=failed.kind)
            request.events.put(("error", failed.message))
        finally:
            self._arrived.set()

    def _exchange(self, request: _Request) -> None:
        params = request.params
        body: dict[str, Any] = {
            "model": self.upstream.model,
            "prompt": request.prompt,
            "max_tokens": request.budget,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        key = self._key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with self._client.stream("POST", self.upstream.completions_url, json=body, headers=headers) as response:
            stream = response.extensions.get("network_stream")
            request.attach(stream.get_extra_info("socket") if stream is not None else None)
            if request.stop.is_set():
                return
            if response.status_code != 200:
                raise _Failure(
                    f"the upstream answered HTTP {response.status_code}{self._excerpt(response, key)}",
                    f"http_{response.status_code}",
                )
            finished = False
            for data in _events(response.iter_bytes(), request.stop):
                if data == b"[DONE]":
                    return
                finished = self._event(request, data, key) or finished
            if not request.stop.is_set() and not finished:
                raise _Failure("the upstream's answer ended before it was complete", "truncated")

    def _event(self, request: _Request, data: bytes, key: str | None) -> bool:
        """Queue what one event says; whether it ended the answer (a finish reason)."""
        try:
            found = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _Failure("the upstream sent an event that is not JSON", "malformed") from None
        if not isinstance(found, dict):
            raise _Failure("the upstream sent an event that is not a JSON object", "malformed")
        if "error" in found:
            raise _Failure(f"the upstream reported an error{_quote(found['error'], key)}", "stream_error")
        usage = found.get("usage")
        if isinstance(usage, dict):
            tokens = usage.get("completion_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
                request.events.put(("usage", tokens))
        choices = found.get("choices")
        if not isinstance(choices, list):
            raise _Failure("the upstream sent an event without choices", "malformed")
        finished = any(self._choice(request, choice) for choice in choices[:1])
        self._arrived.set()
        return finished

    @staticmethod
    def _choice(request: _Request, choice: object) -> bool:
        if not isinstance(choice, dict):
            raise _Failure("the upstream sent a choice that is not an object", "malformed")
        text = choice.get("text")
        if text is None and isinstance(choice.get("delta"), dict):  # a chat-shaped chunk
            text = choice["delta"].get("content")
        if text is not None and not isinstance(text, str):
            raise _Failure("the upstream sent text that is not a string", "malformed")
        if text:
            request.events.put(("text", text))
        finish = choice.get("finish_reason")
        if finish is None:
            return False
        request.events.put(("finish", _FINISHES.get(str(finish), FINISH_STOP)))
        return True

    def _excerpt(self, response: httpx.Response, key: str | None) -> str:
        raw = b""
        with contextlib.suppress(httpx.HTTPError):
            for chunk in response.iter_bytes():
                raw += chunk
                if len(raw) >= 8192:
                    break
        try:
            found = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _quote(raw.decode("utf-8", "replace"), key)
        if isinstance(found, dict) and "error" in found:
            return _quote(found["error"], key)
        return _quote(found, key)

    def _failure(self, exc: BaseException, request: _Request) -> _Failure:
        where = self.upstream.host
        if request.stop.is_set():
            return _Failure("the generation was cancelled", "cancelled")
        if isinstance(exc, httpx.ConnectTimeout):
            return _Failure(f"the upstream {where} did not accept a connection within the timeout", "connect_timeout")
        if isinstance(exc, httpx.ConnectError):
            return _Failure(f"the upstream {where} could not be reached (connection refused or no route)", "connect")
        if isinstance(exc, httpx.TimeoutException):
            timeout = f"{self.upstream.timeout_s:g}"
            return _Failure(f"the upstream {where} sent nothing for {timeout} s", "timeout")
        if isinstance(exc, httpx.HTTPError):
            return _Failure(f"the connection to the upstream {where} broke off", "connection")
        log.warning("upstream_fault", job_id=str(request.key), error_type=type(exc).__name__)
        return _Failure("the upstream's answer could not be read", "internal")


def _events(chunks: Iterator[bytes], stop: threading.Event) -> Iterator[bytes]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines); comments,
    ``id``, ``event`` and ``retry`` fields skipped. A line or stream past its bound is a failure."""
    pending = b""
    data: list[bytes] = []
    total = 0
    for chunk in chunks:
        if stop.is_set():
            return
        total += len(chunk)
        if total > MAX_STREAM_BYTES:
            raise _Failure("the upstream's answer is larger than a worker accepts", "oversized")
        pending += chunk
        while True:
            end = pending.find(b"\n")
            if end < 0:
                break
            line, pending = pending[:end].rstrip(b"\r"), pending[end + 1 :]
            if not line:
                if data:
                    yield b"\n".join(data)
                    data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
        if len(pending) > MAX_LINE_BYTES:
            raise _Failure("the upstream sent a line longer than a worker accepts", "oversized")
    if data:
        yield b"\n".join(data)


def _quote(found: object, key: str | None) -> str:
    """``: "…"``, at most ``EXCERPT_CHARS`` of the server's own message (an OpenAI error object's
    ``message``), control characters and the key removed; '' when there is nothing to quote."""
    if isinstance(found, dict):
        found = found.get("message", "")
    if not isinstance(found, str):
        found = orjson.dumps(found).decode() if found is not None else ""
    text = str(found)
    if key:
        text = text.replace(key, "[key]")
    text = _CONTROL.sub(" ", text).strip()
    text = re.sub(r"(?i)bearer\s+\S+", "Bearer [key]", text)
    if not text:
        return ""
    if len(text) > EXCERPT_CHARS:
        text = text[: EXCERPT_CHARS - 1] + "…"
    return f': "{text}"'
