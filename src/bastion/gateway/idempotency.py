"""``Idempotency-Key``: a retried request gets the first request's outcome, never a second job.

The record ``idem:{tenant}:{sha256(key)}`` is written by the same script that queues the job
(``enqueue.lua``), so of any number of concurrent requests with one key exactly one is queued;
the others learn its job id. It holds a fingerprint of the request (path and body): the same key
with a different request is a 422. For an async job the record is enough (the job id is the
outcome). For a sync call the job's envelope names the record, and the worker's completion
script (``queue/lua/outcome.lua``) stores the outcome in it (24 h), so a retry gets it even when
the gateway that waited has died; a duplicate that arrives while the first is in flight waits for
that answer (or for the job's own stored outcome). An outcome of ``expired`` is not kept (the
gateway's abandon or the worker deletes the record): the deadline passed before the job ran, so a
retry runs it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from bastion.constants import TERMINAL_STATUSES, idempotency_key, job_key
from bastion.errors import DeadlineExceeded, InvalidInput
from bastion.gateway.replies import Reply

_POLL_S = 0.02


@dataclass(frozen=True, slots=True)
class Idempotency:
    redis_key: str
    fingerprint: str

    @property
    def pair(self) -> tuple[str, str]:
        return self.redis_key, self.fingerprint


def from_request(header: str | None, tenant: str, path: str, body: bytes) -> Idempotency | None:
    if header is None:
        return None
    if not 0 < len(header) <= 255 or not header.isprintable():
        raise InvalidInput("Idempotency-Key must be 1 to 255 printable characters")
    digest = hashlib.sha256(header.encode()).hexdigest()
    fingerprint = hashlib.sha256(path.encode() + b"\x00" + body).hexdigest()
    return Idempotency(idempotency_key(tenant, digest), fingerprint)


async def replay(redis: Any, idem: Idempotency, job_id: str, wait_s: float) -> Reply:
    """The outcome of the first request with this key, waiting for it while it is in flight."""
    deadline = time.monotonic() + wait_s
    while True:
        stored = await redis.hmget(idem.redis_key, "status", "result", "error")
        if stored[0]:
            return Reply(stored[0].decode(), stored[1] or b"", (stored[2] or b"").decode())
        job = await redis.hmget(job_key(job_id), "final", "status", "result", "error")
        if job[0] and job[1] and job[1].decode() in TERMINAL_STATUSES:
            return Reply(job[1].decode(), job[2] or b"", (job[3] or b"").decode())
        if time.monotonic() >= deadline:
            raise DeadlineExceeded(f"the first request with this Idempotency-Key has no outcome within {wait_s:.3g} s")
        await asyncio.sleep(_POLL_S)
