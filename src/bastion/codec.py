"""The binary tensor codec used inside queue messages.

A blob is a JSON header line ``[[name, dtype, shape], ...]``, a newline, then each tensor's
raw little-endian bytes in header order. It carries numbers only: nothing in it can run code.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from bastion.errors import InvalidInput

_ALLOWED_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"}
)


def encode(tensors: dict[str, np.ndarray]) -> bytes:
    header = []
    parts = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header.append([name, arr.dtype.name, list(arr.shape)])
        parts.append(arr.tobytes())
    return orjson.dumps(header) + b"\n" + b"".join(parts)


def decode(blob: bytes) -> dict[str, np.ndarray]:
    head, sep, body = blob.partition(b"\n")
    if not sep:
        raise InvalidInput("tensor blob has no header")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, dtype, shape in orjson.loads(head):
        if dtype not in _ALLOWED_DTYPES:
            raise InvalidInput(f"tensor blob names an unsupported dtype {dtype!r}")
        dt = np.dtype(dtype)
        count = math.prod(shape)
        nbytes = count * dt.itemsize
        if offset + nbytes > len(body):
            raise InvalidInput("tensor blob is truncated")
        out[name] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
        offset += nbytes
    return out
