"""Process helpers shared by the supervisor and the worker's prefork master (Linux)."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In a child: receive ``signum`` when the parent dies, however it dies (PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)
    except (OSError, AttributeError):
        pass


def death_signal() -> int:
    """The parent-death signal set for this process (0: none)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        found = ctypes.c_int(0)
        libc.prctl(2, ctypes.byref(found))  # PR_GET_PDEATHSIG
    except (OSError, AttributeError):
        return 0
    return found.value
