"""Unpredictable ids, cheaply: random bytes from the operating system, read a block at a time.

Each id is fresh bytes of ``os.urandom`` (the kernel's CSPRNG, the source ``secrets`` uses), so
no id says anything about another; reading 4 KiB per system call instead of 8 bytes per id takes
the call off the request path. A forked child starts with an empty block of its own, so parent
and child never hand out the same bytes.
"""

from __future__ import annotations

import os

_BLOCK = 4096


class _Pool:
    def __init__(self) -> None:
        self.block = b""
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.block):
            self.block, self.at = os.urandom(_BLOCK), 0
        start = self.at
        self.at += n
        return self.block[start : self.at]

    def reset(self) -> None:
        self.block, self.at = b"", 0


_POOL = _Pool()
os.register_at_fork(after_in_child=_POOL.reset)


def hex_id(nbytes: int = 8) -> str:
    """``nbytes`` random bytes as hex (16 characters by default)."""
    return _POOL.take(nbytes).hex()
