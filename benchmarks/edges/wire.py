"""Raw HTTP/1.1 over plain sockets, for requests no well-behaved client library would send.

``exchange`` writes a request (given as chunks, so a 20 MB header is never held in memory
twice) from one thread while another reads, so an answer the server sends before it has read
everything (a 431, a 401 before the body) is seen even when the server then resets the
connection. Every socket is closed before the function returns, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MIB = 1 << 20
# Answers that mean the server refused the request before doing its work.
REFUSALS = {400, 401, 403, 408, 413, 414, 429, 431, 503}


@dataclass
class Answer:
    """What came back for one raw request."""

    status: int | None  # None: the connection closed (or timed out) with no status line
    seconds: float  # from the first byte written to the status line (or the close)
    sent_bytes: int  # what the server had taken when the exchange ended
    complete: bool  # the whole request was written
    error: str = ""  # what happened to the connection, if anything
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def describe(self) -> str:
        what = f"{self.status}" if self.status is not None else f"closed ({self.error or 'no answer'})"
        sent = "all sent" if self.complete else f"{self.sent_bytes / MIB:.1f} MB taken"
        return f"{what} after {self.seconds:.2f} s, {sent}"


def connect(host: str, port: int, source: str, timeout_s: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout_s, source_address=(source, 0))


def repeat(prefix: bytes, filler: bytes, total: int, suffix: bytes, chunk: int = MIB) -> Iterator[bytes]:
    """``prefix``, then ``total`` bytes of ``filler`` repeated, then ``suffix``, in chunks."""
    yield prefix
    block = (filler * (chunk // len(filler) + 1))[:chunk]
    left = total
    while left > 0:
        piece = block[: min(chunk, left)]
        left -= len(piece)
        yield piece
    yield suffix


def parse_head(raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return None, {}, b""
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def exchange(
    host: str, port: int, source: str, chunks: Iterable[bytes], timeout_s: float = 30.0, max_body: int = 1 << 16
) -> Answer:
    """Send ``chunks`` as one request and read the answer's head (and up to ``max_body`` bytes)."""
    started = time.monotonic()
    try:
        sock = connect(host, port, source, timeout_s)
    except OSError as exc:
        return Answer(None, time.monotonic() - started, 0, False, f"connect: {type(exc).__name__}")
    sent = [0]
    complete = [False]
    send_error = [""]

    def send() -> None:
        try:
            for piece in chunks:
                sock.sendall(piece)
                sent[0] += len(piece)
            complete[0] = True
        except OSError as exc:
            send_error[0] = type(exc).__name__

    sender = threading.Thread(target=send, name="raw-sender", daemon=True)
    sender.start()
    try:
        status, headers, body, answered_at, error = _read(sock, max_body)
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(5.0)
    seconds = (answered_at or time.monotonic()) - started
    if status is None and send_error[0] and not error:
        error = send_error[0]
    return Answer(status, seconds, sent[0], complete[0], error, headers, body[:max_body])


def _read(sock: socket.socket, max_body: int) -> tuple[int | None, dict[str, str], bytes, float, str]:
    """Status, headers, body (up to ``max_body``), when the status came, and what ended the read."""
    raw = body = b""
    status: int | None = None
    headers: dict[str, str] = {}
    answered_at = 0.0
    try:
        while True:
            piece = sock.recv(1 << 16)
            if not piece:
                return status, headers, body, answered_at, "closed by the server"
            if status is None:
                raw += piece
                status, headers, body = parse_head(raw)
                answered_at = time.monotonic() if status is not None else 0.0
            else:
                body += piece
            if status is not None and len(body) >= min(int(headers.get("content-length", "0") or 0), max_body):
                return status, headers, body, answered_at, ""
    except TimeoutError:
        return status, headers, body, answered_at, "timed out waiting for an answer"
    except OSError as exc:
        return status, headers, body, answered_at, type(exc).__name__


def request_bytes(method: str, path: str, host: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
