"""Run a suspect job in a child process, so a job that kills its process kills only the child.

A job delivered again (its last worker died holding it, or its model call was stopped) may be
one that blows up whatever runs it: memory the kernel's OOM killer answers with SIGKILL, a crash
in native code. Run in the worker, it would cost a worker process (and a restart) on every
delivery. So a redelivered job runs in a child forked from the worker - models already loaded,
memory shared copy-on-write, a fork is milliseconds. The child only computes and writes its
answer to a pipe, touches nothing of the parent's (connections, locks, files) and ends with
``os._exit``; in a confined worker it is confined further first (``confine.confine_child``: no
descriptor but its pipe, no socket, no process). If it dies, the worker lives: the job is released
for redelivery, counted, and dead-lettered after ``max_deliveries``.

onnxruntime is run with one intra-op and one inter-op thread (the defaults here), so the
forked child has no thread pool of the parent's to miss.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from bastion.errors import InvalidInput
from bastion.runtime.base import LoadedModel
from bastion.worker.batching import run_each
from bastion.worker.confine import confine_child

_OK, _INPUT, _FAILED = b"0", b"1", b"2"


class ChildDied(Exception):
    """The child running the job died without an answer (killed, or crashed)."""


class Child:
    """The watchdog's handle on a running child: stopping it kills it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.killed = False

    def terminate(self) -> None:
        """SIGKILL, once: the watchdog repeats its stop, and a reaped child's pid may be reused."""
        if self.killed:
            return
        self.killed = True
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_isolated(loaded: LoadedModel, blob: bytes, started: Callable[[Child], None]) -> bytes:
    """The job's encoded outputs, computed in a forked child; ``started`` gets the child's handle
    (to watch it) before the wait. Raises ``InvalidInput`` / ``RuntimeError`` as the model did,
    or ``ChildDied``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: compute, answer, leave without running any of the parent's cleanup
        os.close(read_end)
        try:
            confine_child(write_end)
            payload = _OK + run_each(loaded, blob)
        except InvalidInput as exc:
            payload = _INPUT + exc.detail.encode()
        except BaseException:
            payload = _FAILED
        try:
            _write_all(write_end, payload)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        started(Child(pid))
        data = _read_all(read_end)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if not data or os.WIFSIGNALED(status):
        cause = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        raise ChildDied(f"the process running the job died ({cause})")
    kind, body = data[:1], data[1:]
    if kind == _OK:
        return body
    if kind == _INPUT:
        raise InvalidInput(body.decode(errors="replace"))
    raise RuntimeError("the model could not run this input")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
