"""The worker's prefork master: import once, fork the worker loop, fork it again when it dies.

A worker process killed by a job (the OOM killer, a crash in native code) would otherwise be
started again from nothing: Python, numpy and onnxruntime imports and model loads, about a CPU
second, paid while the other workers need the CPU. The master has done the imports (never a
connection, a session or a thread), so a new worker loop is a fork away: milliseconds. It takes
back its unacknowledged jobs under the same consumer name, as after any restart.

The master forwards SIGTERM/SIGINT to the loop and exits when the loop has stopped; the loop
dies with the master (PDEATHSIG). Crash loops back off from 0.1 s to 5 s.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from types import FrameType

from bastion import logs
from bastion.procs import die_with_parent

log = logs.get("bastion.worker")


class Prefork:
    def __init__(self, serve: Callable[[], None]) -> None:
        self.serve = serve
        self.stopping = False
        self.child = 0
        self.forks = 0

    def stop(self, signum: int, _frame: FrameType | None = None) -> None:
        self.stopping = True
        if self.child:
            os.kill(self.child, signum)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        backoff = 0.0
        while not self.stopping:
            started = time.monotonic()
            self.child = self._fork()
            if self.stopping:  # a signal that came between the fork and the line above
                os.kill(self.child, signal.SIGTERM)
            _, status = os.waitpid(self.child, 0)
            self.child = 0
            if self.stopping:
                break
            backoff = 0.0 if time.monotonic() - started > 10 else min(max(backoff * 2, 0.1), 5.0)
            how = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
            log.warning("worker_loop_died", how=how, restart_in_s=backoff, forks=self.forks)
            time.sleep(backoff)

    def _fork(self) -> int:
        master = os.getpid()
        pid = os.fork()
        if pid:
            self.forks += 1
            return pid
        code = 1
        try:  # the worker loop: its own signal handlers, dies with the master
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            die_with_parent(signal.SIGKILL)
            if os.getppid() != master:  # the master died before PDEATHSIG was set (in a container
                os._exit(1)  # the master is PID 1 itself, so "parent is 1" cannot be the test)
            self.serve()
            code = 0
        except BaseException as exc:
            log.error("worker_loop_failed", error_type=type(exc).__name__)
        finally:
            os._exit(code)
